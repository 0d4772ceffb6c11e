"""The evaluator's Kafka consumers: model candidates (one at a time) and live signals per version."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from google.protobuf.message import DecodeError
from kafka.consumer.fetcher import ConsumerRecord

from flywheel_common.errors import InvalidArgument, NotFound
from flywheel_common.event_signing import EventSigner
from flywheel_common.kafka import EventConsumer, decode
from flywheel_common.redaction import REDACTED_HEADER
from flywheel_common.registry import check_version_name
from flywheel_evaluator.gatekeeper import RefusedCandidate
from flywheel_evaluator.live import CLIENT_DEADLINE, ERROR_REASONS, LiveStore, Signal
from flywheel_evaluator.metrics import FEEDBACK_UNSIGNED, INTERACTIONS_UNSIGNED, SIGNALS
from flywheel_evaluator.settings import EvaluatorSettings
from flywheel_proto.flywheel.events.v1 import events_pb2

log = logging.getLogger(__name__)


class CandidateConsumer(EventConsumer):
    """Gates each ModelCandidate inside the poll loop; the offset is committed once it is decided.

    One record per poll, and a long `max_poll_interval_ms`, because an evaluation takes minutes
    while kafka-python's heartbeat thread keeps the membership alive.
    """

    def __init__(
        self,
        settings: EvaluatorSettings,
        on_candidate: Callable[[events_pb2.ModelCandidate], None],
        cancel: threading.Event,
    ) -> None:
        super().__init__(
            settings.kafka,
            [settings.kafka.topics.candidates],
            settings.consumer_group,
            max_records=1,
            consumer_options={"max_poll_interval_ms": settings.max_poll_interval_ms},
        )
        self._on_candidate = on_candidate
        self._cancel = cancel

    def signal_shutdown(self) -> None:
        """Also stops an evaluation in progress (its candidate is gated again after a restart)."""
        # Shutdown first: the cancelled evaluation's error then finds the consumer stopping.
        super().signal_shutdown()
        self._cancel.set()

    def handle(self, records: list[ConsumerRecord]) -> None:
        for record in records:
            try:
                candidate = decode(record, events_pb2.ModelCandidate)
            except DecodeError:
                self.dead_letter(record, "not a ModelCandidate")
                continue
            if not candidate.version:
                self.dead_letter(record, "ModelCandidate without a version")
                continue
            try:
                check_version_name(candidate.version)
            except InvalidArgument as exc:
                # Retried, it would be refused again, and hold up every later candidate.
                self.dead_letter(record, f"ModelCandidate with a {exc}")
                continue
            try:
                self._on_candidate(candidate)
            except NotFound as exc:
                self.dead_letter(record, f"candidate version is not in the registry: {exc}")
            except RefusedCandidate as exc:
                self.dead_letter(record, f"candidate refused: {exc}")


_FEEDBACK_KINDS = {
    events_pb2.FEEDBACK_KIND_RATING: "rating",
    events_pb2.FEEDBACK_KIND_THUMBS: "thumbs",
    events_pb2.FEEDBACK_KIND_IGNORED: "ignored",
}


# Reviewers' votes (an expert accepting an answer in the console) say what an expert thinks, not
# how visitors fared; the canary's live signals are the visitors'.
_REVIEWERS = (events_pb2.REVIEWER_ROLE_EXPERT, events_pb2.REVIEWER_ROLE_ADMIN)


def feedback_signal(event: events_pb2.Feedback, now: float) -> Signal | None:
    """The live signal in a visitor's feedback event (None for comments, corrections, reviewers'
    votes and out-of-range values)."""
    kind = _FEEDBACK_KINDS.get(event.kind)
    if kind is None or not event.model_version or event.reviewer_role in _REVIEWERS:
        return None
    if kind == "rating" and not 1 <= event.value <= 5:
        return None
    if kind == "thumbs" and event.value not in (-1, 1):
        return None
    at = event.created_at.ToSeconds() if event.created_at.seconds else now
    return Signal(
        event.model_version,
        float(at),
        kind,  # type: ignore[arg-type]
        float(event.value),
        query_id=event.query_id,
        session=event.submitter_pseudonym,
    )


def interaction_signal(event: events_pb2.Interaction, now: float) -> Signal | None:
    """A served answer: its version, latency and whether it failed."""
    if not event.model_version:
        return None
    at = event.created_at.ToSeconds() if event.created_at.seconds else now
    failed = event.finish_reason in ERROR_REASONS
    # An answer its caller ended ("client_deadline") took as long as the caller chose: not timed.
    latency = None if event.finish_reason == CLIENT_DEADLINE else event.total_ms
    return Signal(
        event.model_version,
        float(at),
        "interaction",
        0.0,
        latency,
        failed,
        query_id=event.query_id,
        session=event.session_pseudonym,
    )


class SignalConsumer(EventConsumer):
    """Counts feedback (and served interactions) per version into the live store, then commits."""

    def __init__(self, settings: EvaluatorSettings, store: LiveStore) -> None:
        topics = [settings.kafka.topics.feedback]
        if settings.live.consume_interactions:
            topics.append(settings.kafka.topics.interactions)
        super().__init__(settings.kafka, topics, f"{settings.consumer_group}-signals")
        self.store = store
        self._feedback_topic = settings.kafka.topics.feedback
        # Votes steer the canary: only feedback the feedback service signed counts, and only the
        # answers inference signed (their errors and latency judge it too).
        self._signer = EventSigner.of_key_file(settings.event_signing_key_file)
        self._interaction_signer = EventSigner.for_interactions_of_key_file(settings.query_id_key_file)

    def handle(self, records: list[ConsumerRecord]) -> None:
        now = time.time()
        signals: list[Signal] = []
        for record in records:
            try:
                if record.topic == self._feedback_topic:
                    if not self._signer.signed(record):
                        FEEDBACK_UNSIGNED.inc()
                        self.dead_letter(record, "feedback event unsigned or badly signed")
                        continue
                    signal = feedback_signal(decode(record, events_pb2.Feedback), now)
                else:
                    if not self._interaction_signer.signed(record, mark=REDACTED_HEADER):
                        INTERACTIONS_UNSIGNED.inc()
                        self.dead_letter(record, "interaction event unsigned or badly signed")
                        continue
                    signal = interaction_signal(decode(record, events_pb2.Interaction), now)
            except DecodeError:
                self.dead_letter(record, f"not a {record.topic} event")
                continue
            if signal is not None:
                signals.append(signal)
        self.store.record(signals)
        for signal in signals:
            SIGNALS.labels(signal.kind).inc()
