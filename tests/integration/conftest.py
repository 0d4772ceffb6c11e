"""Integration fixtures: one real Kafka broker for the session, a unique set of topics per test, and
a poll-until-true helper."""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from flywheel_cli.local.kafka_broker import LocalBroker
from flywheel_common.kafka import client_config, ensure_topics
from flywheel_common.settings import KafkaSettings, TopicSettings


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A single-node KRaft broker on loopback (jars fetched by Maven on first use)."""
    home: Path = tmp_path_factory.mktemp("kafka")
    with LocalBroker(data_dir=home, log_file=home / "broker.log", stop_with_parent=True) as broker:
        yield broker


@pytest.fixture
def kafka_settings(kafka_broker: LocalBroker, request: pytest.FixtureRequest) -> KafkaSettings:
    """Settings pointing at the session broker, with topics no other test uses (created here)."""
    if kafka_broker.pid is None:  # a test that stopped the broker failed before restarting it
        kafka_broker.start()
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:60].strip("-")
    suffix = f"{name}-{uuid.uuid4().hex[:6]}"
    topics = TopicSettings(**{field: f"test.{suffix}.{field}" for field in TopicSettings.model_fields})
    settings = KafkaSettings(
        bootstrap_servers=kafka_broker.bootstrap_servers,
        topics=topics,
        partitions=2,
        request_timeout_ms=5000,
        client_id=f"test-{os.getpid()}",
    )
    ensure_topics(settings)
    return settings


def _consumer(settings: KafkaSettings, topic: str) -> tuple[KafkaConsumer, list[TopicPartition]]:
    consumer = KafkaConsumer(**client_config(settings), enable_auto_commit=False, group_id=None)
    partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    consumer.assign(partitions)
    return consumer, partitions


@pytest.fixture
def topic_count(kafka_settings: KafkaSettings) -> Callable[[str], int]:
    """How many records a topic holds (sum of end offsets)."""

    def count(topic: str) -> int:
        consumer, partitions = _consumer(kafka_settings, topic)
        try:
            return sum(consumer.end_offsets(partitions).values())
        finally:
            consumer.close()

    return count


@pytest.fixture
def read_topic(kafka_settings: KafkaSettings) -> Callable[..., list[ConsumerRecord]]:
    """Every record of a topic from the beginning, waiting up to `timeout_s` for `expected` of them."""

    def read(topic: str, expected: int, timeout_s: float = 20.0) -> list[ConsumerRecord]:
        consumer, partitions = _consumer(kafka_settings, topic)
        try:
            consumer.seek_to_beginning(*partitions)
            records: list[ConsumerRecord] = []
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                end = sum(consumer.end_offsets(partitions).values())
                for batch in consumer.poll(timeout_ms=200).values():
                    records.extend(batch)
                if len(records) >= max(expected, end):
                    break
            return records
        finally:
            consumer.close()

    return read


WaitUntil = Callable[..., bool]


def _wait_until(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> bool:
    """Whether `check` came true within `timeout_s`, asked every `interval_s`."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


@pytest.fixture(scope="session")
def wait_until() -> WaitUntil:
    return _wait_until
