"""The FeedbackService: authenticate, rate-limit, validate, redact, pseudonymise, await Kafka's ack."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Histogram

from flywheel_common.auth import Authenticator, Principal, Role
from flywheel_common.errors import (
    FlywheelError,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from flywheel_common.event_signing import SIGNATURE_HEADER, EventSigner
from flywheel_common.grpc_server import request_metadata
from flywheel_common.kafka import EventProducer, event_headers
from flywheel_common.metrics import with_label_values
from flywheel_common.pseudonym import pseudonymise
from flywheel_common.query_ids import QueryIdClaims, QueryIdSigner
from flywheel_common.redaction import Redactor
from flywheel_common.text import clean_text, has_unsafe
from flywheel_feedback.idempotency import IdempotencyCache, feedback_id
from flywheel_feedback.ratelimit import RateLimiter
from flywheel_feedback.settings import FeedbackSettings
from flywheel_proto.flywheel.events.v1 import events_pb2
from flywheel_proto.flywheel.feedback.v1 import feedback_pb2, feedback_pb2_grpc

log = logging.getLogger(__name__)

_KIND_NAMES = {
    events_pb2.FEEDBACK_KIND_RATING: "rating",
    events_pb2.FEEDBACK_KIND_THUMBS: "thumbs",
    events_pb2.FEEDBACK_KIND_COMMENT: "comment",
    events_pb2.FEEDBACK_KIND_CORRECTION: "correction",
    events_pb2.FEEDBACK_KIND_IGNORED: "ignored",
}

_REASONS: dict[type[FlywheelError], str] = {
    Unauthenticated: "unauthenticated",
    PermissionDenied: "permission_denied",
    ResourceExhausted: "rate_limited",
    Unavailable: "unavailable",
    InvalidArgument: "invalid_argument",
}
_INVALID_QUERY_ID = "invalid_query_id"

# Every known label value starts at 0, so the first refusal (or acceptance) is seen by rate() and
# the alert's ratio has its denominator before anything is accepted.
ACCEPTED = with_label_values(
    Counter("flywheel_feedback_accepted", "Feedback stored on Kafka (acknowledged), by kind.", ["kind"]),
    *_KIND_NAMES.values(),
)
REJECTED = with_label_values(
    Counter("flywheel_feedback_rejected", "Submissions refused, by reason.", ["reason"]),
    *_REASONS.values(),
    _INVALID_QUERY_ID,
    "other",
)
DUPLICATES = Counter("flywheel_feedback_duplicates", "Retries answered from the idempotency cache.")
PRODUCE_DURATION = Histogram(
    "flywheel_feedback_produce_duration_seconds",
    "Time from handing an event to Kafka until the broker acknowledged it.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PRODUCE_FAILURES = Counter("flywheel_feedback_produce_failures", "Events Kafka did not acknowledge in time.")
REDACTED = Counter("flywheel_feedback_redacted", "Pieces of personal data redacted, by kind.", ["kind"])


def _printable(value: str) -> bool:
    return all(33 <= ord(c) < 127 for c in value)


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    """Answers OK only once the event is on Kafka; every refusal has its status and reason metric."""

    def __init__(
        self,
        settings: FeedbackSettings,
        *,
        producer: EventProducer,
        authenticator: Authenticator,
        redactor: Redactor,
        signer: QueryIdSigner,
        pseudonym_key: bytes,
    ) -> None:
        self._settings = settings
        self._limits = settings.validation
        self._topic = settings.kafka.topics.feedback
        self._producer = producer
        self._auth = authenticator
        self._redactor = redactor
        self._signer = signer
        self._pseudonym_key = pseudonym_key
        self._limiter = RateLimiter(settings.rate_limit.per_second, settings.rate_limit.burst)
        self._cache = IdempotencyCache(settings.idempotency_cache_size, settings.idempotency_ttl_s)
        self._timeout_s = settings.produce_timeout_ms / 1000
        # The reviewer role and the session in an event are only as good as its signature: the
        # trainer and the evaluator verify it.
        self._event_signer = EventSigner.of_key_file(settings.privacy.event_signing_key_file)

    async def SubmitFeedback(
        self, request: feedback_pb2.SubmitFeedbackRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.SubmitFeedbackResponse:
        """A visitor's rating, thumbs, comment or ignored signal."""
        try:
            principal = self._admit(request_metadata(context))
            claims = self._verify_within_limit(principal, request.query_id)
            event = self._feedback_event(request, principal, claims)
            await self._redact(event)
            return await self._store(event, principal, request.idempotency_key)
        except FlywheelError as exc:
            self._rejected(exc)
            raise

    async def SubmitCorrection(
        self, request: feedback_pb2.SubmitCorrectionRequest, context: grpc.aio.ServicerContext
    ) -> feedback_pb2.SubmitFeedbackResponse:
        """An expert reviewer's corrected answer and note."""
        try:
            principal = self._admit(request_metadata(context), Role.EXPERT, Role.ADMIN)
            self._limiter.check(principal.token_hash)
            claims = self._verify(request.query_id)
            event = self._correction_event(request, principal, claims)
            await self._redact(event)
            return await self._store(event, principal, request.idempotency_key)
        except FlywheelError as exc:
            self._rejected(exc)
            raise

    @staticmethod
    def _rejected(exc: FlywheelError) -> None:
        reason = getattr(exc, "reason", None) or _REASONS.get(type(exc), "other")
        REJECTED.labels(reason).inc()

    def _admit(self, metadata: Mapping[str, str], *roles: Role) -> Principal:
        principal = self._auth.authenticate(metadata)
        if roles:
            principal.require(*roles)
        return principal

    def _verify_within_limit(self, principal: Principal, query_id: str) -> QueryIdClaims:
        """Checks the query id, then takes one token from the bucket of the visitor session it
        names: a gateway relays every visitor on one token, and one bucket for all of them would
        let a few visitors use up everyone's. A query id without a session, and a bad one, count
        against the caller's token."""
        try:
            claims = self._verify(query_id)
        except InvalidArgument:
            self._limiter.check(principal.token_hash)
            raise
        session = claims.session_pseudonym
        self._limiter.check(f"{principal.token_hash}/{session}" if session else principal.token_hash)
        return claims

    def _verify(self, query_id: str) -> QueryIdClaims:
        if not query_id:
            exc = InvalidArgument("query_id is required")
        elif len(query_id) > self._limits.max_query_id_chars:
            exc = InvalidArgument(f"query_id is longer than {self._limits.max_query_id_chars} characters")
        else:
            try:
                return self._signer.verify(query_id)
            except InvalidArgument as error:
                exc = error
        exc.reason = _INVALID_QUERY_ID  # type: ignore[attr-defined]
        raise exc

    def _text(self, value: str, name: str, limit: int, *, required: bool) -> str:
        if len(value) > limit:
            raise InvalidArgument(f"{name} is longer than {limit} characters")
        # Control, escape and bidi characters never reach logs, Kafka or training data.
        stripped = clean_text(value).strip()
        if required and not stripped:
            raise InvalidArgument(f"{name} must not be empty")
        return stripped

    async def _redact(self, event: events_pb2.Feedback) -> None:
        """Replaces personal data in the event's texts; Presidio takes up to ~0.7 s for 8,000
        characters, so it runs off the event loop (after authentication, rate limit and checks)."""
        for name in ("redacted_text", "redacted_note"):
            text = getattr(event, name)
            if not text:
                continue
            redacted = await asyncio.to_thread(self._redactor.redact, text)
            for kind, count in redacted.found.items():
                REDACTED.labels(kind).inc(count)
            setattr(event, name, redacted.text)

    def _common(
        self,
        principal: Principal,
        claims: QueryIdClaims,
        idempotency_key: str,
        session_id: str = "",
        *,
        visitor: bool,
    ) -> events_pb2.Feedback:
        if len(idempotency_key) > self._limits.max_idempotency_key_chars or not _printable(idempotency_key):
            raise InvalidArgument(
                f"idempotency_key must be printable ASCII of at most "
                f"{self._limits.max_idempotency_key_chars} characters"
            )
        if len(session_id) > self._limits.max_session_id_chars:
            raise InvalidArgument(f"session_id is longer than {self._limits.max_session_id_chars} characters")
        if has_unsafe(session_id):
            raise InvalidArgument("session_id must not contain control characters")
        # A visitor's feedback counts as the session the signed query id names, whatever the caller
        # claims, so one visitor cannot pass for many (docs/security.md). Without one (a request
        # without a session, or an id issued before ids carried it): the caller's session, else its
        # token; an expert's correction is the expert's token's.
        if visitor and claims.session_pseudonym:
            submitter = claims.session_pseudonym
        elif session_id:
            submitter = pseudonymise(self._pseudonym_key, session_id, domain="session")
        else:
            submitter = pseudonymise(self._pseudonym_key, principal.token_hash, domain="token")
        created = Timestamp()
        created.GetCurrentTime()
        return events_pb2.Feedback(
            query_id=claims.query_id,
            reviewer_role=principal.role.reviewer_role,
            submitter_pseudonym=submitter,
            created_at=created,
            model_version=claims.model_version,
        )

    def _feedback_event(
        self, request: feedback_pb2.SubmitFeedbackRequest, principal: Principal, claims: QueryIdClaims
    ) -> events_pb2.Feedback:
        # An expert's rating (accepting an answer in the console) is the expert's, not the asker's.
        visitor = principal.role is Role.USER
        event = self._common(principal, claims, request.idempotency_key, request.session_id, visitor=visitor)
        signal = request.WhichOneof("signal")
        if signal == "rating":
            if not 1 <= request.rating <= 5:
                raise InvalidArgument("rating must be between 1 and 5")
            event.kind, event.value = events_pb2.FEEDBACK_KIND_RATING, request.rating
        elif signal == "thumbs_up":
            event.kind, event.value = events_pb2.FEEDBACK_KIND_THUMBS, 1 if request.thumbs_up else -1
        elif signal == "comment":
            event.kind = events_pb2.FEEDBACK_KIND_COMMENT
            event.redacted_text = self._text(
                request.comment, "comment", self._limits.max_comment_chars, required=True
            )
        elif signal == "ignored":
            if not request.ignored:
                raise InvalidArgument("ignored must be true when set")
            event.kind = events_pb2.FEEDBACK_KIND_IGNORED
        else:
            raise InvalidArgument("one of rating, thumbs_up, comment or ignored is required")
        return event

    def _correction_event(
        self, request: feedback_pb2.SubmitCorrectionRequest, principal: Principal, claims: QueryIdClaims
    ) -> events_pb2.Feedback:
        event = self._common(principal, claims, request.idempotency_key, visitor=False)
        event.kind = events_pb2.FEEDBACK_KIND_CORRECTION
        event.redacted_text = self._text(
            request.corrected_answer, "corrected_answer", self._limits.max_correction_chars, required=True
        )
        event.redacted_note = self._text(request.note, "note", self._limits.max_note_chars, required=False)
        return event

    async def _store(
        self, event: events_pb2.Feedback, principal: Principal, idempotency_key: str
    ) -> feedback_pb2.SubmitFeedbackResponse:
        # Retries are recognised per caller, answer and key; the id is derived from them, so a
        # retry that reaches another replica (or this one after a restart) carries the same id
        # and consumers drop it.
        scope = f"{principal.token_hash}|{event.query_id}|{idempotency_key}" if idempotency_key else ""
        event.feedback_id = feedback_id(self._pseudonym_key, scope)
        if scope:
            duplicate = await self._cache.once(scope, lambda: self._produce(event))
        else:
            await self._produce(event)
            duplicate = False
        kind = _KIND_NAMES.get(event.kind, "unknown")
        if duplicate:
            DUPLICATES.inc()
        else:
            ACCEPTED.labels(kind).inc()
        log.debug(
            "feedback %s",
            "duplicate" if duplicate else "stored",
            extra={"feedback_id": event.feedback_id, "kind": kind, "role": principal.role.value},
        )
        return feedback_pb2.SubmitFeedbackResponse(feedback_id=event.feedback_id, duplicate=duplicate)

    async def _produce(self, event: events_pb2.Feedback) -> None:
        started = time.perf_counter()
        try:
            # The producer's own delivery timeout matches; this bound only guards against a stuck client.
            async with asyncio.timeout(self._timeout_s + 1.0):
                signature = self._event_signer.sign(
                    self._topic, event.query_id.encode(), event.SerializeToString()
                )
                headers = [*event_headers(event), (SIGNATURE_HEADER, signature)]
                await self._producer.produce(self._topic, event.query_id, event, headers)
        except (Unavailable, TimeoutError) as exc:
            PRODUCE_FAILURES.inc()
            raise Unavailable(
                "feedback could not be stored (Kafka unavailable); retry with the same key"
            ) from exc
        PRODUCE_DURATION.observe(time.perf_counter() - started)
