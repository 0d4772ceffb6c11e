"""flywheel_common.kafka on the real broker: acked produce, trace headers, outage buffering, consumers."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from kafka import KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from flywheel_cli.local.kafka_broker import LocalBroker, default_libs_dir
from flywheel_common.errors import Unavailable
from flywheel_common.kafka import (
    EVENT_TYPE_HEADER,
    BufferedEventProducer,
    EventConsumer,
    EventProducer,
    client_config,
    decode,
    ensure_topics,
    extract_trace_context,
    header,
)
from flywheel_common.runtime import ConsumerThread
from flywheel_common.settings import KafkaSettings
from flywheel_proto.flywheel.events.v1 import events_pb2

pytestmark = pytest.mark.integration


def test_topics_are_created_idempotently(kafka_settings: KafkaSettings) -> None:
    # The fixture created them; a second run creates nothing and does not fail.
    assert ensure_topics(kafka_settings) == []


async def test_produce_waits_for_the_ack_and_carries_trace_context(
    kafka_settings: KafkaSettings, read_topic: Callable[..., list[ConsumerRecord]]
) -> None:
    tracer = TracerProvider().get_tracer("test")
    producer = EventProducer(kafka_settings)
    producer.connect([kafka_settings.topics.feedback])
    try:
        with tracer.start_as_current_span("submit") as span:
            metadata = await producer.produce(
                kafka_settings.topics.feedback, "q-1", events_pb2.Feedback(query_id="q-1", value=3)
            )
        assert metadata.offset == 0
    finally:
        producer.close()
    [record] = read_topic(kafka_settings.topics.feedback, 1)
    assert record.key == b"q-1"
    assert decode(record, events_pb2.Feedback).value == 3
    assert header(record, EVENT_TYPE_HEADER) == b"flywheel.events.v1.Feedback"
    context = trace.get_current_span(extract_trace_context(record.headers)).get_span_context()
    assert context.trace_id == span.get_span_context().trace_id


async def test_produce_fails_with_unavailable_while_the_broker_is_down(
    kafka_broker: LocalBroker, kafka_settings: KafkaSettings
) -> None:
    producer = EventProducer(kafka_settings, delivery_timeout_ms=1500)
    producer.connect([kafka_settings.topics.feedback])
    kafka_broker.stop(kill=True)
    try:
        with pytest.raises(Unavailable):
            await producer.produce(kafka_settings.topics.feedback, "q", events_pb2.Feedback(query_id="q"))
    finally:
        kafka_broker.start()
    # Back within seconds: the first sends may still find no metadata (Unavailable), then they go.
    deadline = time.monotonic() + 15
    while True:
        try:
            await producer.produce(kafka_settings.topics.feedback, "q", events_pb2.Feedback(query_id="q"))
            break
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    producer.close()


def test_buffered_producer_accepts_while_the_broker_is_down_and_delivers_after(
    kafka_broker: LocalBroker, kafka_settings: KafkaSettings, read_topic: Callable[..., list[ConsumerRecord]]
) -> None:
    registry = CollectorRegistry()
    gauge = Gauge("buffered", "", registry=registry)
    dropped = Counter("dropped", "", registry=registry)
    topic = kafka_settings.topics.interactions
    buffer = BufferedEventProducer(
        kafka_settings,
        name="interactions",
        max_buffered=300,
        buffered_gauge=gauge,
        dropped_counter=dropped,
        delivery_timeout_ms=2000,
        retry_backoff_s=0.2,
    ).start()
    try:
        for i in range(50):
            assert buffer.emit(topic, f"q{i}", events_pb2.Interaction(query_id=f"q{i}"))
        assert buffer.flush(20)
        kafka_broker.stop(kill=True)
        try:
            started = time.monotonic()
            for i in range(50, 350):
                assert buffer.emit(topic, f"q{i}", events_pb2.Interaction(query_id=f"q{i}"))
            assert time.monotonic() - started < 1.0, "emit must not block while Kafka is down"
            time.sleep(3)  # past the client's delivery timeout: events go back to the buffer
            assert buffer.buffered == 300
            assert registry.get_sample_value("buffered") == 300
            # Full: the next one is dropped and counted, not silently lost.
            assert not buffer.emit(topic, "over", events_pb2.Interaction(query_id="over"))
            assert registry.get_sample_value("dropped_total") == 1
        finally:
            kafka_broker.start()
        assert buffer.flush(30), f"{buffer.buffered} events still buffered"
    finally:
        buffer.close(timeout_s=5)
    assert buffer.stats.delivered == 350
    # At least once: a request the broker wrote while its ack was lost (a restart under load) is
    # sent again, and consumers keep one record per query id; none may be missing.
    records = read_topic(topic, 350)
    assert {r.key for r in records} == {f"q{i}".encode() for i in range(350)}
    assert registry.get_sample_value("buffered") == 0


def test_an_event_kafka_can_never_take_does_not_hold_up_the_ones_behind_it(
    kafka_settings: KafkaSettings, topic_count: Callable[[str], int]
) -> None:
    registry = CollectorRegistry()
    dropped = Counter("dropped", "", registry=registry)
    rejected = Counter("rejected", "", registry=registry)
    topic = kafka_settings.topics.interactions
    buffer = BufferedEventProducer(
        kafka_settings, name="interactions", dropped_counter=dropped, rejected_counter=rejected
    ).start()
    try:
        # Over the producer's max_request_size (1 MiB): no broker state makes it fit.
        huge = events_pb2.Interaction(query_id="huge", page_title="x" * (2 * 1024 * 1024))
        assert buffer.emit(topic, "huge", huge)
        for i in range(20):
            assert buffer.emit(topic, f"q{i}", events_pb2.Interaction(query_id=f"q{i}"))
        assert buffer.flush(20), f"{buffer.buffered} events still buffered behind the oversized one"
    finally:
        buffer.close(timeout_s=5)
    assert topic_count(topic) == 20
    assert (buffer.stats.delivered, buffer.stats.rejected, buffer.stats.dropped) == (20, 1, 0)
    assert registry.get_sample_value("rejected_total") == 1
    assert registry.get_sample_value("dropped_total") == 0


def test_close_counts_what_it_could_not_deliver(kafka_settings: KafkaSettings) -> None:
    settings = kafka_settings.model_copy(update={"bootstrap_servers": "127.0.0.1:1"})
    buffer = BufferedEventProducer(settings, name="test", retry_backoff_s=0.1).start()
    for i in range(5):
        buffer.emit("nowhere", f"k{i}", events_pb2.Interaction(query_id="x"))
    buffer.close(timeout_s=0.5)
    assert buffer.stats.dropped == 5
    assert buffer.stats.delivered == 0


class _Collector(EventConsumer):
    def __init__(self, settings: KafkaSettings, expected: int) -> None:
        super().__init__(settings, [settings.topics.feedback], group_id="test-collector", poll_timeout_ms=100)
        self.values: list[int] = []
        self._expected = expected

    def handle(self, records: list[ConsumerRecord]) -> None:
        for record in records:
            if record.key == b"poison":
                self.dead_letter(record, "not a Feedback")
                continue
            self.values.append(decode(record, events_pb2.Feedback).value)
        if len(self.values) >= self._expected:
            self.signal_shutdown()


async def test_consumer_runs_until_shutdown_and_dead_letters(
    kafka_settings: KafkaSettings, read_topic: Callable[..., list[ConsumerRecord]]
) -> None:
    producer = EventProducer(kafka_settings)
    producer.connect([kafka_settings.topics.feedback])
    for value in range(5):
        await producer.produce(kafka_settings.topics.feedback, f"q{value}", events_pb2.Feedback(value=value))
    producer.send_raw(kafka_settings.topics.feedback, b"poison", b"\xff\xff", []).get(10)
    producer.close()

    consumer = _Collector(kafka_settings, expected=5)
    thread = threading.Thread(target=consumer.run)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    assert sorted(consumer.values) == [0, 1, 2, 3, 4]
    assert consumer.heartbeat_age_s() < 5
    [dead] = read_topic(kafka_settings.topics.dead_letter, 1)
    assert dead.key == b"poison"
    assert header(dead, "flywheel-dlq-reason") == b"not a Feedback"


class _Idle(EventConsumer):
    """Consumes and drops: only its group membership matters here."""

    def __init__(self, settings: KafkaSettings, group_id: str) -> None:
        super().__init__(settings, [settings.topics.feedback], group_id, poll_timeout_ms=100)

    def handle(self, records: list[ConsumerRecord]) -> None:
        pass


def test_assigned_partitions_gauge_follows_the_group(
    kafka_settings: KafkaSettings, wait_until: Callable[..., bool]
) -> None:
    """flywheel_kafka_assigned_partitions (FlywheelConsumerWithoutPartitions) is at 0 before the
    group assigns anything, counts what this process's consumers hold through two rebalances, and is
    back at 0 once they left."""
    group, topic = f"test-assigned-{uuid.uuid4().hex[:6]}", kafka_settings.topics.feedback

    def held() -> float | None:
        return REGISTRY.get_sample_value(
            "flywheel_kafka_assigned_partitions", {"group": group, "topic": topic}
        )

    first, second = _Idle(kafka_settings, group), _Idle(kafka_settings, group)
    assert held() == 0  # the series exists before a consumer joins: an alert can see it stay at 0
    threads = [threading.Thread(target=c.run, daemon=True) for c in (first, second)]
    threads[0].start()
    try:
        assert wait_until(lambda: held() == kafka_settings.partitions, 60), held()
        # A second member: the group splits the partitions (each revoked, then some assigned again).
        threads[1].start()
        assert wait_until(
            lambda: first.assigned and second.assigned and held() == kafka_settings.partitions, 60
        )
        second.signal_shutdown()
        threads[1].join(30)
        assert not threads[1].is_alive() and not second.assigned
        # The first member takes every partition back.
        assert wait_until(lambda: held() == kafka_settings.partitions, 60), held()
    finally:
        for consumer, thread in zip((first, second), threads, strict=True):
            consumer.signal_shutdown()
            if thread.is_alive():
                thread.join(30)
    assert not threads[0].is_alive()
    assert held() == 0


# Records any Java client may send and kafka-python cannot: neither key nor value; a null header value.
_UNSENDABLE = """
import java.util.Properties;
import org.apache.kafka.clients.producer.*;
import org.apache.kafka.common.header.internals.RecordHeader;
import org.apache.kafka.common.serialization.ByteArraySerializer;

public class Unsendable {
    public static void main(String[] args) throws Exception {
        Properties p = new Properties();
        p.put("bootstrap.servers", args[0]);
        p.put("key.serializer", ByteArraySerializer.class.getName());
        p.put("value.serializer", ByteArraySerializer.class.getName());
        try (KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(p)) {
            producer.send(new ProducerRecord<byte[], byte[]>(args[1], 0, null, null)).get();
            ProducerRecord<byte[], byte[]> r =
                new ProducerRecord<>(args[1], 0, "k".getBytes(), "v".getBytes());
            r.headers().add(new RecordHeader("x-null", (byte[]) null));
            producer.send(r).get();
        }
    }
}
"""


class _FailsOnce(EventConsumer):
    """Dead-letters every record not keyed q*; the first q* one fails (the consumer is restarted)."""

    def __init__(self, settings: KafkaSettings) -> None:
        group = f"test-dlq-{uuid.uuid4().hex[:6]}"
        super().__init__(settings, [settings.topics.feedback], group, poll_timeout_ms=100, max_records=1)
        self.values: list[int] = []
        self.failed = False

    def handle(self, records: list[ConsumerRecord]) -> None:
        for record in records:
            if not (record.key or b"").startswith(b"q"):
                self.dead_letter(record, "not a Feedback")
            elif not self.failed:
                self.failed = True
                raise RuntimeError("the store is locked")
            else:
                self.values.append(decode(record, events_pb2.Feedback).value)


def test_a_restarted_consumer_dead_letters_what_kafka_python_cannot_send_as_it_is(
    kafka_settings: KafkaSettings,
    read_topic: Callable[..., list[ConsumerRecord]],
    wait_until: Callable[..., bool],
    tmp_path: Path,
) -> None:
    """After a restart the dead-letter producer works again, and records it cannot send as they
    are (no key nor value, a null header, too large once the dead-letter headers are added) go
    anyway, so the partition moves on to the records behind them."""
    topic = kafka_settings.topics.feedback
    big = b"x" * 1_048_400  # the broker takes it; with the dead-letter headers it is over 1 MiB
    producer = KafkaProducer(**client_config(kafka_settings), acks="all", max_request_size=2_000_000)
    for key, value in ((b"poison", b"\xff"), (b"q1", events_pb2.Feedback(value=1).SerializeToString())):
        producer.send(topic, key=key, value=value, partition=0).get(10)
    java = shutil.which("java")
    assert java, "Java runs the broker too"
    (tmp_path / "Unsendable.java").write_text(_UNSENDABLE)
    subprocess.run(
        [
            java,
            "-cp",
            f"{default_libs_dir()}/*",
            str(tmp_path / "Unsendable.java"),
            kafka_settings.bootstrap_servers,
            topic,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    for key, value in ((b"big", big), (b"q5", events_pb2.Feedback(value=5).SerializeToString())):
        producer.send(topic, key=key, value=value, partition=0).get(10)
    producer.close()

    consumer = _FailsOnce(kafka_settings)
    restarts = {"group": consumer.group_id}
    thread = ConsumerThread(consumer, restart_after_s=0.1)
    thread.start()
    try:
        assert wait_until(lambda: consumer.values == [1, 5], 60), consumer.values
    finally:
        consumer.signal_shutdown()
        thread._thread.join(30)
    assert (REGISTRY.get_sample_value("flywheel_kafka_consumer_restarts_total", restarts) or 0) >= 1
    dead = {header(r, "flywheel-dlq-source"): r for r in read_topic(kafka_settings.topics.dead_letter, 4)}
    assert set(dead) == {f"{topic}/0/{offset}".encode() for offset in (0, 2, 3, 4)}
    empty, null_header, too_large = (dead[f"{topic}/0/{offset}".encode()] for offset in (2, 3, 4))
    assert (empty.key, empty.value) == (b"", None)
    assert (null_header.value, header(null_header, "x-null")) == (b"v", b"")
    assert (too_large.key, too_large.value) == (b"big", b"")
    assert header(too_large, "flywheel-dlq-original-size") == str(3 + len(big)).encode()
    assert header(too_large, "flywheel-dlq-truncated") == b"MessageSizeTooLargeError"
