"""Answers are logged to Kafka once sent: redacted, through a bounded buffer that survives outages."""

from __future__ import annotations

import logging
import queue
import threading
import time

from flywheel_common.event_signing import SIGNATURE_HEADER, EventSigner
from flywheel_common.kafka import BufferedEventProducer
from flywheel_common.redaction import REDACTED_HEADER, Redactor, redact_interaction
from flywheel_inference.metrics import (
    INTERACTIONS_BUFFERED,
    INTERACTIONS_DROPPED,
    INTERACTIONS_REDACTED,
    INTERACTIONS_REJECTED,
)
from flywheel_inference.settings import InferenceSettings
from flywheel_proto.flywheel.events.v1 import events_pb2

log = logging.getLogger(__name__)

# Inference's pod gets 45 s to stop (the chart's terminationGracePeriodSeconds), its gRPC server up
# to 20 s of them (grpc.grace_s); the sink's close takes this plus up to 3 s to close the client.
CLOSE_TIMEOUT_S = 15.0


class KafkaInteractionSink:
    """Publishes Interaction events keyed by query id; never blocks or fails an answer.

    Personal data is redacted first (question, answer, title, URL, passages), on a thread of its
    own: raw text never reaches Kafka, and the answer never waits for the redactor. What waits for
    redaction counts against the same bound as the producer's buffer (`interaction_buffer` in all).
    Each event is signed, so the trainer and the evaluator take no interaction (nor its "redacted"
    mark) from anyone else.
    """

    def __init__(self, settings: InferenceSettings, signer: EventSigner) -> None:
        self.topic = settings.kafka.topics.interactions
        self._signer = signer
        self.producer = BufferedEventProducer(
            settings.kafka,
            name="interactions",
            max_buffered=settings.interaction_buffer,
            buffered_gauge=INTERACTIONS_BUFFERED,
            dropped_counter=INTERACTIONS_DROPPED,
            rejected_counter=INTERACTIONS_REJECTED,
        ).start()
        self._redaction = settings.redaction
        self._redactor = (
            Redactor(presidio=settings.redaction.presidio) if settings.redaction.enabled else None
        )
        # Bounded in publish(), together with the producer's buffer.
        self._queue: queue.Queue[tuple[str, events_pb2.Interaction] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="redact-interactions", daemon=True)
        self._thread.start()

    @property
    def held(self) -> int:
        """Interactions waiting for redaction, being redacted, or buffered for Kafka."""
        # One being handed over counts twice for a moment: the bound errs on the safe side.
        return self._queue.unfinished_tasks + self.producer.buffered

    def publish(self, key: str, event: events_pb2.Interaction) -> None:
        if self.held >= self.producer.max_buffered:
            self.producer.drop(1, "buffer full")
            return
        self._queue.put_nowait((key, event))

    def flush(self, timeout_s: float) -> bool:
        """Waits until every published interaction was redacted and acknowledged by Kafka."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks and self.producer.flush(max(deadline - time.monotonic(), 0))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._redact_and_emit(*item)
            finally:
                self._queue.task_done()

    def _redact_and_emit(self, key: str, event: events_pb2.Interaction) -> None:
        headers: list[tuple[str, bytes]] = []
        if self._redactor is not None:
            try:
                found = redact_interaction(
                    event, self._redactor, keep_url_query=self._redaction.keep_url_query
                )
            except Exception:  # never publish what could not be redacted
                log.exception("redacting an interaction failed; it is dropped")
                INTERACTIONS_REJECTED.inc()
                return
            for kind, count in found.items():
                INTERACTIONS_REDACTED.labels(kind).inc(count)
            headers = [(REDACTED_HEADER, b"1")]
        # The redacted event and its mark: consumers trust the mark only as signed.
        context = REDACTED_HEADER.encode() if headers else b""
        signature = self._signer.sign(self.topic, key.encode(), event.SerializeToString(), context)
        headers.append((SIGNATURE_HEADER, signature))
        self.producer.emit(self.topic, key, event, headers=headers)

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Redacts and delivers what it can within `timeout_s` (half for each); the interactions
        still waiting for redaction then, and those Kafka did not take, are counted and logged as
        dropped."""
        deadline = time.monotonic() + timeout_s
        self._queue.put(None)
        self._thread.join(timeout=timeout_s / 2)
        left = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            self._queue.task_done()
            left += item is not None
        if left:
            self.producer.drop(left, "still waiting for redaction at shutdown")
        # For a redaction still running: it hands its interaction over (or the closed buffer drops
        # it), then stops.
        self._queue.put(None)
        self.producer.close(timeout_s=max(deadline - time.monotonic(), 0.0))


def build_sink(settings: InferenceSettings, query_id_key: bytes) -> KafkaInteractionSink:
    return KafkaInteractionSink(settings, EventSigner.for_interactions(query_id_key))
