"""The trainer's Kafka consumer: interactions and feedback in, stored examples out, offsets after."""

from __future__ import annotations

import logging
import time

from google.protobuf.message import DecodeError
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError

from flywheel_common.event_signing import EventSigner
from flywheel_common.kafka import EventConsumer, decode, header
from flywheel_common.redaction import REDACTED_HEADER, Redactor, redact_interaction
from flywheel_proto.flywheel.events.v1 import events_pb2
from flywheel_trainer import metrics
from flywheel_trainer.settings import TrainerSettings
from flywheel_trainer.store import JoinStore, signal_of

log = logging.getLogger(__name__)


class TrainerConsumer(EventConsumer):
    """One consumer group over the interaction and feedback topics.

    `handle` stores a polled batch in one SQLite transaction; the base class commits the offsets
    only after it returned, so a crash in between redelivers events the store already drops.
    """

    def __init__(self, settings: TrainerSettings, store: JoinStore) -> None:
        topics = settings.kafka.topics
        super().__init__(
            settings.kafka,
            [topics.interactions, topics.feedback],
            settings.consumer.group_id,
            poll_timeout_ms=settings.consumer.poll_timeout_ms,
            max_records=settings.consumer.max_records,
        )
        self.store = store
        self._interactions_topic = topics.interactions
        self._feedback_topic = topics.feedback
        self.records_handled = 0
        # For interactions a producer did not redact (an older inference, or one with redaction off):
        # the store and the datasets only ever hold redacted text.
        self._redactor: Redactor | None = None
        # Feedback carries the reviewer's role: only what the feedback service signed is trusted;
        # interactions (the text examples are made of, and its redaction mark) only as inference signed.
        self._signer = EventSigner.of_key_file(settings.event_signing_key_file)
        self._interaction_signer = EventSigner.for_interactions_of_key_file(settings.query_id_key_file)
        self._retention_s = settings.retention_s

    def handle(self, records: list[ConsumerRecord]) -> None:
        # Before the batch: one that keeps failing must not hide the lag growing behind it.
        self._update_lag()
        interactions: list[events_pb2.Interaction] = []
        feedback = []
        for record in records:
            try:
                if record.topic == self._interactions_topic:
                    if not self._interaction_signer.signed(record, mark=REDACTED_HEADER):
                        metrics.INTERACTIONS_UNSIGNED.inc()
                        self.dead_letter(record, "interaction event unsigned or badly signed")
                        continue
                    interaction = decode(record, events_pb2.Interaction)
                    # As for feedback: the store would keep a replay of an answer it purged another
                    # full window (stored as received now). Its signed time says it is stale.
                    if self._stale(interaction.created_at.seconds):
                        metrics.INTERACTIONS_STALE.inc()
                        continue
                    if header(record, REDACTED_HEADER) is None:
                        self._redactor = self._redactor or Redactor(presidio=False)
                        redact_interaction(interaction, self._redactor)
                    interactions.append(interaction)
                elif record.topic == self._feedback_topic:
                    if not self._signer.signed(record):
                        metrics.FEEDBACK_UNSIGNED.inc()
                        self.dead_letter(record, "feedback event unsigned or badly signed")
                        continue
                    event = decode(record, events_pb2.Feedback)
                    # The store forgets what it has seen after the retention window, so a signed
                    # event replayed later would count again; its signed time says it is stale
                    # (the feedback service stamps every event).
                    if self._stale(event.created_at.seconds):
                        metrics.FEEDBACK_STALE.inc()
                        continue
                    feedback.append(signal_of(event))
            except DecodeError as exc:
                self.dead_letter(record, f"not a {record.topic} event: {exc}")
        result = self.store.ingest(interactions, feedback)
        for source, n in result.examples.items():
            metrics.EXAMPLES.labels(source).inc(n)
        if result.duplicates:
            metrics.FEEDBACK_DUPLICATES.inc(result.duplicates)
        self.records_handled += len(records)
        if result.examples or result.ignored:
            log.info(
                "stored %d records: examples %s, ignored %s, duplicates %d",
                len(records),
                dict(result.examples),
                dict(result.ignored),
                result.duplicates,
                extra={"examples": dict(result.examples)},
            )

    def _stale(self, created: int) -> bool:
        """Whether an event created at `created` (0: unstamped) is older than the retention window."""
        return bool(created) and time.time() - created > self._retention_s

    def _update_lag(self) -> None:
        # The high watermark comes with every fetch response: no extra request to the broker. The
        # position is past the polled batch already: the lag counts what waits behind it.
        kafka = self.kafka
        if kafka is None:
            return
        try:
            for tp in kafka.assignment():
                high = kafka.highwater(tp)
                if high is not None:
                    lag = max(high - kafka.position(tp), 0)
                    metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(lag)
        except KafkaError as exc:
            log.debug("consumer lag not updated: %s", exc)
