"""The example policy: which feedback on which answer becomes which kind of training example."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from flywheel_proto.flywheel.events.v1 import events_pb2
from flywheel_trainer.settings import PolicySettings

_ROLES = {
    "user": events_pb2.REVIEWER_ROLE_USER,
    "expert": events_pb2.REVIEWER_ROLE_EXPERT,
    "admin": events_pb2.REVIEWER_ROLE_ADMIN,
}


class Source(enum.StrEnum):
    """Where an example comes from; `negative` examples are never training targets."""

    CORRECTION = "correction"
    POSITIVE = "positive"
    NEGATIVE = "negative"


@dataclass(frozen=True)
class FeedbackSignal:
    """The parts of a Feedback event the trainer keeps (redacted text, the submitter's pseudonym)."""

    feedback_id: str
    query_id: str
    kind: int
    value: int
    text: str
    role: int
    # The session the feedback counts for (the asker's, from the signed query id; never in datasets).
    session: str = ""


@dataclass(frozen=True)
class Decision:
    """What one piece of feedback contributes: an example of `source`, or nothing (`source` None)."""

    source: Source | None
    why: str = ""


class ExamplePolicy:
    """Corrections -> supervised; high ratings / thumbs up -> positive; low ones -> negative."""

    def __init__(self, settings: PolicySettings) -> None:
        self.settings = settings
        self._correction_roles = {_ROLES[r] for r in settings.correction_roles}
        self._trusted_roles = {_ROLES[r] for r in settings.trusted_positive_roles}
        self._positive_roles = {_ROLES[r] for r in settings.positive_roles}

    def needs_agreement(self, signal: FeedbackSignal) -> bool:
        """Whether a positive from this signal waits for other sessions to agree before it trains."""
        return self.settings.positive_min_sessions > 1 and signal.role not in self._trusted_roles

    def decide(self, signal: FeedbackSignal, model_answer: str) -> Decision:
        """The example kind `signal` makes of the answer it is about."""
        s = self.settings
        kind = signal.kind
        if kind == events_pb2.FEEDBACK_KIND_CORRECTION:
            if signal.role not in self._correction_roles:
                return Decision(None, "correction from a role not trusted for corrections")
            if not signal.text.strip():
                return Decision(None, "empty correction")
            if len(signal.text) > s.max_target_chars:
                return Decision(None, "correction too long")
            return Decision(Source.CORRECTION)
        high = (kind == events_pb2.FEEDBACK_KIND_RATING and signal.value >= s.positive_min_rating) or (
            kind == events_pb2.FEEDBACK_KIND_THUMBS and signal.value > 0
        )
        low = (kind == events_pb2.FEEDBACK_KIND_RATING and 0 < signal.value <= s.negative_max_rating) or (
            kind == events_pb2.FEEDBACK_KIND_THUMBS and signal.value < 0
        )
        if high:
            if not s.use_positives:
                return Decision(None, "positives disabled")
            if signal.role not in self._positive_roles:
                return Decision(None, "positive from a role not trusted for positives")
            if not model_answer.strip() or len(model_answer) > s.max_target_chars:
                return Decision(None, "answer unusable as a target")
            return Decision(Source.POSITIVE)
        if low:
            return Decision(Source.NEGATIVE)
        return Decision(None, "no training signal")
