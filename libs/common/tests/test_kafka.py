"""EventConsumer without a broker: dead letters of any record, after restarts; the heartbeat as liveness."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import IllegalStateError, KafkaTimeoutError, MessageSizeTooLargeError
from kafka.structs import TopicPartition
from prometheus_client import REGISTRY

from flywheel_common import kafka as kafka_module
from flywheel_common.errors import Unavailable
from flywheel_common.kafka import EventConsumer
from flywheel_common.runtime import ConsumerThread
from flywheel_common.settings import KafkaSettings

MAX_REQUEST_SIZE = 1000  # the fake producer's max_request_size


def record(offset: int, key: bytes | None, value: bytes | None, headers: Any = ()) -> ConsumerRecord:
    return ConsumerRecord(
        topic="t",
        partition=0,
        leader_epoch=0,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        headers=list(headers),
        checksum=None,
        serialized_key_size=-1,
        serialized_value_size=-1,
        serialized_header_size=-1,
    )


class FakeProducer:
    """kafka-python's KafkaProducer as far as dead letters go, with its checks of a record."""

    sent: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
    broker_away = False

    def __init__(self, **config: Any) -> None:
        self.closed = False

    def partitions_for(self, topic: str) -> set[int]:
        return {0}

    def send(self, topic: str, key: Any = None, value: Any = None, headers: Any = None) -> Any:
        if self.closed:
            raise IllegalStateError("KafkaProducer already closed!")
        if key is None and value is None:
            raise ValueError("Need at least one: key or value")
        if not all(isinstance(k, str) and isinstance(v, bytes) for k, v in headers):
            raise TypeError("All headers items must be (str, bytes) tuples")
        size = len(key or b"") + len(value or b"") + sum(len(k) + len(v) for k, v in headers)
        if size > MAX_REQUEST_SIZE:
            raise MessageSizeTooLargeError(f"The message is {size} bytes")
        if FakeProducer.broker_away:
            raise KafkaTimeoutError("Failed to update metadata after 5.0 secs.")
        FakeProducer.sent.append((key, value, headers))
        return self

    def get(self, timeout: float | None = None) -> None:
        return None

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


@pytest.fixture(autouse=True)
def fake_producer(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FakeProducer]]:
    monkeypatch.setattr(kafka_module, "KafkaProducer", FakeProducer)
    FakeProducer.sent, FakeProducer.broker_away = [], False
    yield FakeProducer


class Log:
    """One partition and the group's committed offset, shared by the consumers a restart makes."""

    def __init__(self, records: list[ConsumerRecord]) -> None:
        self.records = records
        self.committed = 0
        self.broker_away = False


class FakeKafkaConsumer:
    """kafka-python's KafkaConsumer as EventConsumer.run() uses it: a fresh one starts at the commit."""

    def __init__(self, log: Log) -> None:
        if log.broker_away:  # what kafka-python 3 raises when bootstrap times out
            raise KafkaTimeoutError("Bootstrap timed out")
        self.log = log
        self.position = log.committed

    def subscribe(self, topics: list[str], listener: Any = None) -> None:
        pass

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0}

    def poll(self, timeout_ms: int = 0, max_records: int = 1) -> dict[TopicPartition, list[ConsumerRecord]]:
        batch = self.log.records[self.position : self.position + max_records]
        if not batch:
            time.sleep(timeout_ms / 1000)
            return {}
        self.position += len(batch)
        return {TopicPartition("t", 0): batch}

    def commit(self) -> None:
        self.log.committed = self.position

    def close(self) -> None:
        pass


class Consumer(EventConsumer):
    """Dead-letters records keyed b"bad" (and those without a key); fails once on b"fail-once"."""

    def __init__(self, log: Log, group: str = "test-dlq") -> None:
        super().__init__(KafkaSettings(), ["t"], group, poll_timeout_ms=10, max_records=1)
        self.log = log
        self.failed = False
        self.handled: list[int] = []
        self.failing = False  # every batch fails while set

    def _consumer(self) -> Any:
        return FakeKafkaConsumer(self.log)

    def handle(self, records: list[ConsumerRecord]) -> None:
        if self.failing:
            raise RuntimeError("the store is locked")
        for r in records:
            if r.key in (b"bad", None):
                self.dead_letter(r, "not an event")
            elif r.key == b"fail-once" and not self.failed:
                self.failed = True
                raise RuntimeError("the store is locked")
            else:
                self.handled.append(r.offset)


def wait_until(check: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


def skipped(group: str) -> float:
    return REGISTRY.get_sample_value("flywheel_kafka_dead_letters_skipped_total", {"group": group}) or 0.0


def test_a_restarted_consumer_still_dead_letters() -> None:
    """run() closes the dead-letter producer on the way out; the restart must not find it closed."""
    log = Log([record(0, b"bad", b"x"), record(1, b"fail-once", b"y"), record(2, b"bad", b"z")])
    consumer = Consumer(log)
    thread = ConsumerThread(consumer, restart_after_s=0.01)
    thread.start()
    try:
        assert wait_until(lambda: log.committed == 3), f"stuck at offset {log.committed}"
    finally:
        consumer.signal_shutdown()
        thread._thread.join(10)
    assert consumer.failed and consumer.handled == [1]
    assert [value for _, value, _ in FakeProducer.sent] == [b"x", b"z"]


def test_records_kafka_python_cannot_send_as_they_are_still_go_to_the_dead_letter_topic() -> None:
    consumer = Consumer(Log([]))
    consumer.dead_letter(record(0, None, None), "empty")
    consumer.dead_letter(record(1, b"k", b"v", [("x-null", None), ("x", b"1")]), "null header")
    key, value, headers = FakeProducer.sent[0]
    assert (key, value) == (b"", None)
    assert dict(headers)["flywheel-dlq-source"] == b"t/0/0"
    key, value, headers = FakeProducer.sent[1]
    assert (key, value) == (b"k", b"v")
    assert headers[:2] == [("x-null", b""), ("x", b"1")]


def test_a_record_too_large_with_the_dead_letter_headers_goes_as_a_truncated_copy() -> None:
    consumer = Consumer(Log([]))
    consumer.dead_letter(record(7, b"big", b"x" * (MAX_REQUEST_SIZE - 10), [("h", b"1")]), "not an event")
    [(key, value, headers)] = FakeProducer.sent
    assert (key, value) == (b"big", b"")
    assert dict(headers) == {
        "flywheel-dlq-reason": b"not an event",
        "flywheel-dlq-source": b"t/0/7",
        "flywheel-dlq-truncated": b"MessageSizeTooLargeError",
        "flywheel-dlq-original-size": str(3 + MAX_REQUEST_SIZE - 10 + 2).encode(),
    }


def test_a_record_not_even_a_truncated_copy_of_can_go_is_counted_logged_and_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumer = Consumer(Log([]), group="test-dlq-skip")
    before = skipped("test-dlq-skip")
    secret = b"s3cret" * (MAX_REQUEST_SIZE // 6 + 1)  # the key alone is too large
    consumer.dead_letter(record(3, secret, b"payload-text"), "not an event")
    assert FakeProducer.sent == []
    assert skipped("test-dlq-skip") == before + 1
    assert "skipped t/0/3" in caplog.text
    assert "s3cret" not in caplog.text and "payload-text" not in caplog.text


def test_a_broker_that_is_away_is_not_a_reason_to_skip() -> None:
    consumer = Consumer(Log([]), group="test-dlq-away")
    FakeProducer.broker_away = True
    with pytest.raises(Unavailable):
        consumer.dead_letter(record(0, b"bad", b"x"), "not an event")
    assert skipped("test-dlq-away") == 0


def run_in_thread(consumer: Consumer) -> threading.Thread:
    thread = ConsumerThread(consumer, restart_after_s=0.01)
    thread.start()
    return thread._thread


def test_a_consumer_failing_the_same_batch_over_and_over_is_not_alive() -> None:
    log = Log([record(0, b"ok", b"x")])
    consumer = Consumer(log)
    consumer.failing = True
    raw = run_in_thread(consumer)
    try:
        time.sleep(0.6)
        assert log.committed == 0
        assert not consumer.alive(0.3), f"heartbeat {consumer.heartbeat_age_s():.2f} s old"
        consumer.failing = False
        assert wait_until(lambda: log.committed == 1)
        assert wait_until(lambda: consumer.alive(0.3))
    finally:
        consumer.signal_shutdown()
        raw.join(10)


def test_an_idle_consumer_and_one_waiting_for_the_broker_stay_alive() -> None:
    log = Log([])
    consumer = Consumer(log)
    raw = run_in_thread(consumer)
    try:
        time.sleep(0.5)
        assert consumer.alive(0.2)  # empty polls
        log.broker_away = True  # every restart fails to connect from now on
        consumer.failing = True
        log.records.append(record(0, b"ok", b"x"))  # the batch fails: the consumer restarts
        time.sleep(0.5)
        assert consumer.alive(0.2), "a pod restart would not bring the broker back"
    finally:
        consumer.signal_shutdown()
        raw.join(10)


@pytest.mark.parametrize(
    ("retention_ms", "segment_ms"),
    [(14 * 24 * 3600 * 1000, "86400000"), (3600 * 1000, "3600000"), (-1, None)],
)
def test_topics_roll_segments_so_records_do_not_outlive_their_retention(
    retention_ms: int, segment_ms: str | None
) -> None:
    """Kafka deletes whole segments, rolled after 7 days by default: a record could stay a week past."""
    configs = kafka_module.topic_configs(KafkaSettings(retention_ms=retention_ms))
    assert configs["retention.ms"] == str(retention_ms)
    assert configs.get("segment.ms") == segment_ms
