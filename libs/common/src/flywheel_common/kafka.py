"""Kafka clients built in one place: configs, topics, acknowledged and buffered producers, consumers."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.message import Message
from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import (
    CorruptRecordError,
    InvalidRecordError,
    InvalidTimestampError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAlreadyExistsError,
)
from kafka.producer.future import RecordMetadata
from kafka.structs import TopicPartition
from opentelemetry import context as otel_context
from opentelemetry import propagate
from prometheus_client import Counter, Gauge

from flywheel_common.errors import Unavailable
from flywheel_common.secrets import read_secret
from flywheel_common.settings import KafkaSettings

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

# Header naming the protobuf message type of the value, so generic tools (topic tail, dead-letter) can decode.
EVENT_TYPE_HEADER = "flywheel-event-type"

ASSIGNED_PARTITIONS = Gauge(
    "flywheel_kafka_assigned_partitions",
    "Partitions the consumer group assigns to this process's consumers, by group and topic.",
    ["group", "topic"],
)
DEAD_LETTERS_SKIPPED = Counter(
    "flywheel_kafka_dead_letters_skipped",
    "Records a consumer skipped, by group: not even a truncated copy could go to the dead-letter topic.",
    ["group"],
)


def client_config(settings: KafkaSettings) -> dict[str, Any]:
    """kafka-python options shared by producers, consumers and the admin client."""
    config: dict[str, Any] = {
        "bootstrap_servers": [s.strip() for s in settings.bootstrap_servers.split(",") if s.strip()],
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
        "request_timeout_ms": settings.request_timeout_ms,
        # Give up on an unreachable broker after the request timeout, and notice within a second
        # that it is back (kafka-python backs off up to 30 s by default).
        "bootstrap_timeout_ms": settings.request_timeout_ms,
        "reconnect_backoff_max_ms": 1000,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(settings, key)
            if value is not None:
                config[key] = str(value)
    if settings.security_protocol.startswith("SASL"):
        config["sasl_mechanism"] = settings.sasl_mechanism or "PLAIN"
        config["sasl_plain_username"] = settings.sasl_username
        if settings.sasl_password_file is not None:
            config["sasl_plain_password"] = read_secret(
                settings.sasl_password_file, name="kafka sasl password"
            ).decode()
    return config


def all_topics(settings: KafkaSettings) -> list[str]:
    """Every topic Flywheel uses, the dead-letter topic included."""
    return list(settings.topics.model_dump().values())


# Kafka deletes a log segment once its newest record is older than `retention.ms`, and starts a new
# segment only after `segment.ms` (7 days by default): records could outlive the retention by up to a
# week. Segments of at most a day keep what is deleted within a day of the retention.
MAX_SEGMENT_MS = 24 * 3600 * 1000


def topic_configs(settings: KafkaSettings) -> dict[str, str]:
    """The configs a topic is created with: its retention and, under one, segments no longer."""
    configs = {"retention.ms": str(settings.retention_ms)}
    if settings.retention_ms > 0:
        configs["segment.ms"] = str(min(settings.retention_ms, MAX_SEGMENT_MS))
    return configs


def ensure_topics(settings: KafkaSettings, topics: Iterable[str] | None = None) -> list[str]:
    """Creates the topics that do not exist yet (configured partitions, replication, retention and
    segment roll, `topic_configs`).

    Idempotent; returns the names it created. Raises KafkaError when the broker cannot be reached.
    """
    names = list(topics) if topics is not None else all_topics(settings)
    admin = KafkaAdminClient(**client_config(settings))
    created = []
    try:
        existing = set(admin.list_topics())
        for name in names:
            if name in existing:
                continue
            topic = NewTopic(
                name,
                settings.partitions,
                settings.replication_factor,
                topic_configs=topic_configs(settings),
            )
            try:
                admin.create_topics([topic], timeout_ms=settings.request_timeout_ms)
                created.append(name)
            except TopicAlreadyExistsError:
                pass  # Another replica created it between list and create.
    finally:
        admin.close()
    if created:
        log.info("created Kafka topics %s", ", ".join(created))
    return created


def trace_headers(extra: Sequence[tuple[str, bytes]] = ()) -> list[tuple[str, bytes]]:
    """Kafka headers carrying the current trace context (W3C traceparent), plus `extra`."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [*((k, v.encode()) for k, v in carrier.items()), *extra]


def extract_trace_context(headers: Iterable[tuple[str, bytes | None]] | None) -> otel_context.Context:
    """The trace context a producer put in a record's headers (empty context when there is none)."""
    carrier = {k: v.decode(errors="replace") for k, v in headers or () if v is not None}
    return propagate.extract(carrier)


# Errors about the record itself: sending it again fails the same way, whatever the broker's state.
_POISON_ERRORS = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    CorruptRecordError,
    InvalidRecordError,
    InvalidTimestampError,
    TypeError,
    ValueError,
)


def is_poison(exc: BaseException | None) -> bool:
    """Whether a failed send can never succeed (record too large, malformed), so retrying is pointless."""
    while exc is not None:
        if isinstance(exc, _POISON_ERRORS):
            return True
        exc = exc.__cause__
    return False


def event_headers(message: Message) -> list[tuple[str, bytes]]:
    """Trace context and the event's protobuf type name."""
    return trace_headers([(EVENT_TYPE_HEADER, message.DESCRIPTOR.full_name.encode())])


def header(record: ConsumerRecord, name: str) -> bytes | None:
    """The first value of a header of a consumed record."""
    for key, value in record.headers or ():
        if key == name:
            return bytes(value) if value is not None else None
    return None


def decode(record: ConsumerRecord, message_type: type[M]) -> M:
    """Parses a record's value as `message_type`; raises DecodeError when it is not one."""
    message = message_type()
    message.ParseFromString(record.value or b"")
    return message


class EventProducer:
    """Produces protobuf events keyed by query id; `produce` returns once the broker acknowledged.

    acks=all; the client retries until `delivery_timeout_ms`. Broker-side idempotence is off by
    default: kafka-python 3.0.12's idempotent producer wedges after a batch expires while the broker
    is down (later sends never complete, even once the broker is back; see docs/feedback.md). A retry
    can therefore write a record twice; both copies carry the same event id, which consumers dedupe on.

    `produce` batches across concurrent callers (on one event loop): a record goes out at once when
    nothing is awaiting an ack, otherwise it waits in an outbox until the acks in flight arrive (or
    `linger_ms` passed) and leaves with everything that queued meanwhile. One round trip then
    carries many RPCs' records: low latency when idle, few requests under load.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        linger_ms: int = 2,
        delivery_timeout_ms: int = 10_000,
        max_block_ms: int = 200,
        enable_idempotence: bool = False,
        **overrides: Any,
    ) -> None:
        self._settings = settings
        config = client_config(settings)
        request_timeout = min(settings.request_timeout_ms, max(delivery_timeout_ms - 1, 1))
        config.update(
            acks="all",
            enable_idempotence=enable_idempotence,
            # Batching happens in produce()'s outbox; the client sends what it is given at once.
            linger_ms=0,
            delivery_timeout_ms=delivery_timeout_ms,
            request_timeout_ms=request_timeout,
            max_block_ms=max_block_ms,
            retry_backoff_ms=100,
            reconnect_backoff_max_ms=1000,
        )
        config.update(overrides)
        self._config = config
        self._producer: KafkaProducer | None = None
        self._completed: collections.deque[tuple[asyncio.Future[Any], Any, BaseException | None]] = (
            collections.deque()
        )
        self._completed_lock = threading.Lock()
        self._drain_scheduled = False
        self._linger_s = linger_ms / 1000
        self._outbox: list[tuple[str, bytes, bytes, list[tuple[str, bytes]], asyncio.Future[Any]]] = []
        self._outbox_timer: asyncio.TimerHandle | None = None
        self._awaiting_ack = 0  # records of produce() handed to the client, not yet resolved

    def connect(self, topics: Iterable[str] = ()) -> None:
        """Connects (raising KafkaError when the broker is unreachable) and loads the topics' metadata."""
        if self._producer is None:
            self._producer = KafkaProducer(**self._config)
        for topic in topics:
            # Metadata is cached from here on, so send() does not block while the broker is away.
            if not self._producer.partitions_for(topic):
                raise Unavailable(f"topic {topic} does not exist")

    @property
    def connected(self) -> bool:
        """Whether connect() succeeded."""
        return self._producer is not None

    def send(
        self, topic: str, key: str, message: Message, headers: Sequence[tuple[str, bytes]] | None = None
    ) -> Any:
        """Hands the event to the client; returns kafka-python's future (resolved on the broker's ack)."""
        headers = list(headers if headers is not None else event_headers(message))
        return self.send_raw(topic, key.encode(), message.SerializeToString(), headers)

    def send_raw(
        self, topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> Any:
        """Hands already serialised bytes to the client; Unavailable when it refuses them."""
        if self._producer is None:
            raise Unavailable("Kafka producer is not connected")
        try:
            return self._producer.send(topic, key=key, value=value, headers=headers)
        except (KafkaError, TypeError, ValueError) as exc:
            # is_poison(exc) tells a record Kafka can never take from a broker that is away.
            raise Unavailable(f"Kafka refused the record: {type(exc).__name__}") from exc

    async def produce(
        self, topic: str, key: str, message: Message, headers: Sequence[tuple[str, bytes]] | None = None
    ) -> RecordMetadata:
        """Produces one record and waits for the broker's acknowledgement; Unavailable when it fails."""
        if self._producer is None:
            raise Unavailable("Kafka producer is not connected")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[RecordMetadata] = loop.create_future()
        record_headers = list(headers if headers is not None else event_headers(message))
        self._outbox.append((topic, key.encode(), message.SerializeToString(), record_headers, done))
        if self._awaiting_ack == 0:
            # Nothing in flight: go with whatever else this loop iteration queues.
            if len(self._outbox) == 1:
                loop.call_soon(self._flush_outbox, loop)
        elif self._outbox_timer is None:
            self._outbox_timer = loop.call_later(self._linger_s, self._flush_outbox, loop)
        try:
            return await done
        except KafkaError as exc:
            raise Unavailable(f"Kafka did not acknowledge the event: {type(exc).__name__}") from exc

    def _flush_outbox(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._outbox_timer is not None:
            self._outbox_timer.cancel()
            self._outbox_timer = None
        outbox, self._outbox = self._outbox, []
        for topic, key, value, headers, done in outbox:
            try:
                future = self.send_raw(topic, key, value, headers)
            except Unavailable as exc:
                _resolve(done, None, exc)
                continue
            self._awaiting_ack += 1
            future.add_callback(lambda metadata, done=done: self._complete(loop, done, metadata, None))
            future.add_errback(lambda exc, done=done: self._complete(loop, done, None, exc))

    def _complete(
        self,
        loop: asyncio.AbstractEventLoop,
        done: asyncio.Future[Any],
        result: Any,
        exc: BaseException | None,
    ) -> None:
        # Runs on the client's sender thread, once per record. A whole acknowledged batch wakes
        # the event loop once instead of once per record: at high rates that saves a syscall and
        # a GIL hand-over per record.
        self._completed.append((done, result, exc))
        with self._completed_lock:
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        loop.call_soon_threadsafe(self._drain_completed)

    def _drain_completed(self) -> None:
        with self._completed_lock:
            self._drain_scheduled = False
        while self._completed:
            _resolve(*self._completed.popleft())
            self._awaiting_ack -= 1
        if self._awaiting_ack == 0 and self._outbox:
            self._flush_outbox(asyncio.get_running_loop())

    def flush(self, timeout_s: float | None = None) -> None:
        """Waits until every record handed over was acknowledged or failed."""
        if self._producer is not None:
            self._producer.flush(timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Flushes and closes the client."""
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.flush(timeout=timeout_s)
            except KafkaError as exc:
                log.warning("Kafka producer flush on close failed: %s", type(exc).__name__)
            try:
                producer.close(timeout=timeout_s)
            except KafkaError:
                producer.close(timeout=0)


def _resolve(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


@dataclass
class _Pending:
    topic: str
    key: str
    value: bytes
    headers: list[tuple[str, bytes]]
    attempts: int = 0


@dataclass
class BufferStats:
    """What a BufferedEventProducer did so far."""

    delivered: int = 0
    dropped: int = 0
    rejected: int = 0
    retried: int = 0
    buffered: int = 0
    last_error: str = ""


class BufferedEventProducer:
    """Fire-and-forget events: `emit` never blocks, a thread delivers them, retrying while Kafka is away.

    The buffer is bounded (`max_buffered` events, counting those awaiting an ack); an event that
    does not fit is dropped, counted and logged, never silently lost. An event Kafka can never take
    (too large, malformed: `is_poison`) is rejected at once, counted and logged, and the events
    behind it go on: one bad event must not hold the queue. `close()` flushes.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        name: str = "events",
        max_buffered: int = 10_000,
        buffered_gauge: Gauge | None = None,
        dropped_counter: Counter | None = None,
        rejected_counter: Counter | None = None,
        linger_ms: int = 20,
        delivery_timeout_ms: int = 30_000,
        retry_backoff_s: float = 1.0,
        log_interval_s: float = 30.0,
    ) -> None:
        self.name = name
        self.max_buffered = max_buffered
        self._producer = EventProducer(
            settings,
            # Batching happens in produce()'s outbox; the client sends what it is given at once.
            linger_ms=0,
            delivery_timeout_ms=delivery_timeout_ms,
            max_block_ms=1000,
            bootstrap_timeout_ms=5000,
        )
        self._gauge = buffered_gauge
        self._dropped_counter = dropped_counter
        self._rejected_counter = rejected_counter
        self._retry_backoff_s = retry_backoff_s
        self._log_interval_s = log_interval_s
        self._pending: collections.deque[_Pending] = collections.deque()
        self._in_flight = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._outage_since: float | None = None
        self._last_drop_log = 0.0
        self._drops_since_log = 0
        self.stats = BufferStats()
        self._thread = threading.Thread(target=self._run, name=f"kafka-buffer-{name}", daemon=True)

    def start(self) -> BufferedEventProducer:
        """Starts the delivery thread; the broker need not be reachable yet."""
        self._thread.start()
        return self

    @property
    def buffered(self) -> int:
        """Events accepted but not yet acknowledged by the broker."""
        return len(self._pending) + self._in_flight

    def emit(self, topic: str, key: str, message: Message, headers: Sequence[tuple[str, bytes]] = ()) -> bool:
        """Queues an event (thread-safe, never blocks); False when it was dropped or rejected.

        `headers` go beside the trace context and the event type.
        """
        try:
            event = _Pending(topic, key, message.SerializeToString(), [*event_headers(message), *headers])
        except Exception as exc:  # an event that cannot be serialised is rejected, never raised to the caller
            with self._cond:
                self._reject(exc)
            return False
        with self._cond:
            if self._stopping or self.buffered >= self.max_buffered:
                self._drop(1, "buffer full" if not self._stopping else "producer closed")
                return False
            self._pending.append(event)
            self._update_gauge()
            self._cond.notify()
        return True

    def drop(self, count: int, why: str) -> None:
        """Counts and logs events dropped before they reached the buffer (a queue in front of it that
        shares its bound), as the buffer counts its own."""
        with self._cond:
            self._drop(count, why)

    def _drop(self, count: int, why: str) -> None:
        # Called with the lock held.
        self.stats.dropped += count
        self._drops_since_log += count
        if self._dropped_counter is not None:
            self._dropped_counter.inc(count)
        now = time.monotonic()
        if now - self._last_drop_log >= self._log_interval_s or why != "buffer full":
            log.error(
                "dropped %d %s event(s): %s (%d buffered, limit %d, %d dropped in all)",
                self._drops_since_log,
                self.name,
                why,
                self.buffered,
                self.max_buffered,
                self.stats.dropped,
            )
            self._last_drop_log = now
            self._drops_since_log = 0

    def _reject(self, exc: BaseException) -> None:
        # Called with the lock held. The event is gone for good; say why, never what it held.
        self.stats.rejected += 1
        if self._rejected_counter is not None:
            self._rejected_counter.inc()
        cause = exc.__cause__ if isinstance(exc, Unavailable) and exc.__cause__ is not None else exc
        log.error(
            "rejected a %s event Kafka can never take (%s); %d rejected in all",
            self.name,
            type(cause).__name__,
            self.stats.rejected,
        )

    def _update_gauge(self) -> None:
        self.stats.buffered = self.buffered
        if self._gauge is not None:
            self._gauge.set(self.stats.buffered)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return  # stopping and nothing left to hand over
                if not self._producer.connected:
                    event = None
                else:
                    event = self._pending.popleft()
                    self._in_flight += 1
            if event is None:
                if not self._connect():
                    self._wait_backoff()
                continue
            try:
                future = self._producer.send_raw(event.topic, event.key.encode(), event.value, event.headers)
            except Unavailable as exc:
                self._failed(event, exc)
                if not is_poison(exc):
                    self._wait_backoff()
                continue
            future.add_callback(self._delivered)
            future.add_errback(lambda exc, event=event: self._failed(event, exc))

    def _connect(self) -> bool:
        try:
            self._producer.connect()
        except KafkaError as exc:
            self._note_outage(exc)
            return False
        return True

    def _wait_backoff(self) -> None:
        with self._cond:
            if not self._stopping:
                self._cond.wait(self._retry_backoff_s)

    def _note_outage(self, exc: BaseException) -> None:
        self.stats.last_error = type(exc).__name__
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning(
                "Kafka unreachable (%s): buffering %s events (limit %d) and retrying",
                type(exc).__name__,
                self.name,
                self.max_buffered,
            )

    def _delivered(self, _metadata: RecordMetadata) -> None:
        with self._cond:
            self._in_flight -= 1
            self.stats.delivered += 1
            if self._outage_since is not None:
                log.warning(
                    "Kafka reachable again after %.1f s: delivering %d buffered %s events",
                    time.monotonic() - self._outage_since,
                    self.buffered,
                    self.name,
                )
                self._outage_since = None
            self._update_gauge()
            self._cond.notify_all()

    def _failed(self, event: _Pending, exc: BaseException) -> None:
        with self._cond:
            self._in_flight -= 1
            if is_poison(exc):
                self._reject(exc)
                self._update_gauge()
                self._cond.notify_all()
                return
            self._note_outage(exc)
            event.attempts += 1
            self.stats.retried += 1
            # Back to the front: it is retried once the broker answers again.
            self._pending.appendleft(event)
            self._update_gauge()
            self._cond.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Waits until every accepted event was acknowledged; False when some are still buffered."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.buffered and time.monotonic() < deadline:
                self._cond.wait(min(0.1, max(deadline - time.monotonic(), 0.0)))
            return not self.buffered

    def close(self, timeout_s: float = 10.0) -> None:
        """Flushes what it can within the timeout, then counts and logs what is left as dropped."""
        flushed = self.flush(timeout_s)
        with self._cond:
            self._stopping = True
            left = self.buffered
            self._pending.clear()
            if not flushed and left:
                self._drop(left, f"not delivered within {timeout_s:.0f} s of shutdown")
            self._cond.notify_all()
        self._thread.join(timeout=1.0)
        self._producer.close(timeout_s=1.0)
        self._update_gauge()


class EventConsumer(ABC):
    """A Kafka consumer as an object: `run()` polls until `signal_shutdown()`, committing after each batch.

    The poll loop stamps a heartbeat, so liveness is "the loop gets on", not "the process exists".
    Events that cannot be processed go to the dead-letter topic with the reason in a header.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        topics: Sequence[str],
        group_id: str,
        *,
        poll_timeout_ms: int = 500,
        max_records: int = 500,
        auto_offset_reset: str = "earliest",
        consumer_options: Mapping[str, Any] | None = None,
        on_assigned: Callable[[], object] | None = None,
    ) -> None:
        self.settings = settings
        self.topics = list(topics)
        self.group_id = group_id
        self._poll_timeout_ms = poll_timeout_ms
        self._max_records = max_records
        self._auto_offset_reset = auto_offset_reset
        self._consumer_options = dict(consumer_options or {})
        # Called on the consumer's thread when the group assigned partitions (readiness); apps set it
        # once they have an event loop to hand the news to.
        self.on_assigned = on_assigned
        self._shutdown = threading.Event()
        self._heartbeat = time.monotonic()
        self._assigned: set[TopicPartition] = set()
        # At 0 from the start: a consumer the group never assigns anything must show, not be absent.
        for topic in self.topics:
            ASSIGNED_PARTITIONS.labels(group_id, topic)
        self._dead_letters: EventProducer | None = None
        # The running client, for subclasses that read positions (lag) after a poll.
        self.kafka: KafkaConsumer | None = None

    @abstractmethod
    def handle(self, records: list[ConsumerRecord]) -> None:
        """Processes one polled batch; offsets are committed after it returns."""

    @property
    def assigned(self) -> bool:
        """Whether the group gave this consumer any partition."""
        return bool(self._assigned)

    def _set_assigned(self, partitions: set[TopicPartition]) -> None:
        # Changes the gauge by this consumer's difference, so consumers of one group in one process add up.
        before = collections.Counter(tp.topic for tp in self._assigned)
        after = collections.Counter(tp.topic for tp in partitions)
        for topic in self.topics:
            ASSIGNED_PARTITIONS.labels(self.group_id, topic).inc(after[topic] - before[topic])
        self._assigned = partitions

    def heartbeat_age_s(self) -> float:
        """Seconds since the poll loop last got on: an empty poll, a batch handled and committed, or
        a failure that is the broker's."""
        return time.monotonic() - self._heartbeat

    def alive(self, max_age_s: float = 30.0) -> bool:
        """Liveness: the poll loop got on within `max_age_s`."""
        return self.heartbeat_age_s() <= max_age_s

    def signal_shutdown(self) -> None:
        """Asks run() to stop after the current batch; safe from a signal handler or another thread."""
        self._shutdown.set()

    @property
    def stopping(self) -> bool:
        """Whether signal_shutdown() was called."""
        return self._shutdown.is_set()

    def wait_stopping(self, timeout_s: float) -> bool:
        """Waits up to `timeout_s` for signal_shutdown(); True when it came."""
        return self._shutdown.wait(timeout_s)

    def _consumer(self) -> KafkaConsumer:
        options: dict[str, Any] = {
            "group_id": self.group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": self._auto_offset_reset,
            "max_poll_records": self._max_records,
        }
        return KafkaConsumer(**client_config(self.settings), **(options | self._consumer_options))

    def run(self) -> None:
        """Polls, handles and commits until signal_shutdown(); closes the consumer (leaving the group).

        The heartbeat is stamped after an empty poll and after a batch was handled and committed, so
        a consumer that fails the same batch over and over (restarted each time) stops it. A failure
        that is the broker's (unreachable, a rebalance) stamps it too: restarting the process would
        not bring the broker back, and a consumer waiting for it is not stuck.
        """
        try:
            self._run()
        except Exception as exc:
            if _kafka_away(exc):
                self._heartbeat = time.monotonic()
            raise

    def _run(self) -> None:
        consumer = self.kafka = self._consumer()
        owner = self

        class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
                owner._set_assigned(owner._assigned - set(revoked))

            def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
                owner._set_assigned(owner._assigned | set(assigned))
                if owner.on_assigned is not None:
                    owner.on_assigned()

        consumer.subscribe(self.topics, listener=_Listener())
        # The topics' partitions known before the first poll joins the group: a group leader that
        # joined without them assigned nothing and, with kafka-python 3.0, sometimes never rejoined
        # (the evaluator's signal consumer sat without partitions for minutes on a fresh broker).
        for topic in self.topics:
            consumer.partitions_for_topic(topic)
        try:
            while not self._shutdown.is_set():
                batches = consumer.poll(timeout_ms=self._poll_timeout_ms, max_records=self._max_records)
                records = [record for batch in batches.values() for record in batch]
                if records:
                    self.handle(records)
                    consumer.commit()
                self._heartbeat = time.monotonic()
        finally:
            # A closed consumer holds nothing, whether or not the client says so on close (a restart
            # after an error must not start out "assigned").
            self._set_assigned(set())
            consumer.close()
            self.kafka = None
            # Closed, it could send nothing more: a restart of this object builds a new one.
            dead_letters, self._dead_letters = self._dead_letters, None
            if dead_letters is not None:
                dead_letters.close()

    def dead_letter(self, record: ConsumerRecord, reason: str) -> None:
        """Sends a record that cannot be processed to the dead-letter topic (blocking until acked).

        Whatever the record holds, its offset must move on, or it would be retried forever and hold
        up its partition. Null header values go as empty ones, a record without key and value with
        an empty key (kafka-python sends neither as they are). A record Kafka refuses for good
        (`is_poison`: too large once the dead-letter headers are added) goes as a truncated copy: an
        empty value, its original size and why in headers. One that cannot go even so is logged
        (never its content), counted (flywheel_kafka_dead_letters_skipped_total) and skipped. A
        broker that is away raises: the batch is retried, not skipped.
        """
        source = f"{record.topic}/{record.partition}/{record.offset}"
        ours = [("flywheel-dlq-reason", reason.encode()), ("flywheel-dlq-source", source.encode())]
        headers = [(key, value if value is not None else b"") for key, value in record.headers or ()]
        key = b"" if record.key is None and record.value is None else record.key
        try:
            self._send_dead_letter(key, record.value, [*headers, *ours])
            log.warning("sent %s to the dead-letter topic: %s", source, reason)
            return
        except (Unavailable, KafkaError) as exc:
            if not is_poison(exc):
                raise
            refused = _cause_name(exc)
        size = len(record.key or b"") + len(record.value or b"")
        size += sum(len(name.encode()) + len(value) for name, value in headers)
        truncated = [
            *ours,
            ("flywheel-dlq-truncated", refused.encode()),
            ("flywheel-dlq-original-size", str(size).encode()),
        ]
        try:
            self._send_dead_letter(record.key, b"", truncated)
        except (Unavailable, KafkaError) as exc:
            if not is_poison(exc):
                raise
            DEAD_LETTERS_SKIPPED.labels(self.group_id).inc()
            log.error(
                "skipped %s (%d bytes): the dead-letter topic took neither it (%s) nor a truncated "
                "copy (%s); it was to be dead-lettered because: %s",
                source,
                size,
                refused,
                _cause_name(exc),
                reason,
            )
            return
        log.warning(
            "sent a truncated copy of %s (%d bytes, refused as it was: %s) to the dead-letter topic: %s",
            source,
            size,
            refused,
            reason,
        )

    def _send_dead_letter(
        self, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> None:
        if self._dead_letters is None:
            self._dead_letters = EventProducer(self.settings, linger_ms=0, max_block_ms=5000)
        # Again after a failed connect (a broker away the first time): connect() is a no-op once connected.
        self._dead_letters.connect()
        self._dead_letters.send_raw(self.settings.topics.dead_letter, key, value, headers).get(
            timeout=self.settings.request_timeout_ms / 1000
        )


def _cause_name(exc: BaseException) -> str:
    # The client's error, not the Unavailable that wraps it.
    while isinstance(exc, Unavailable) and exc.__cause__ is not None:
        exc = exc.__cause__
    return type(exc).__name__


def _kafka_away(exc: BaseException) -> bool:
    """Whether a consumer failed on Kafka itself (unreachable, a rebalance), not on a record."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, KafkaError):
            return not is_poison(exc)
        cause = cause.__cause__
    return False
