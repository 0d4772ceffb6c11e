"""The servicer's checks, with a fake producer: every bad input has its error and nothing is produced."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from flywheel_common.auth import Authenticator
from flywheel_common.errors import (
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from flywheel_common.pseudonym import pseudonymise
from flywheel_common.query_ids import QueryIdSigner
from flywheel_common.redaction import Redactor
from flywheel_feedback.service import FeedbackServicer
from flywheel_feedback.settings import FeedbackSettings
from flywheel_proto.flywheel.events.v1 import events_pb2
from flywheel_proto.flywheel.feedback.v1 import feedback_pb2

KEY = b"test-query-id-key-0123"
PSEUDONYM_KEY = b"test-pseudonym-key-0123"
USER = (("authorization", "Bearer user-token-1"),)
EXPERT = (("authorization", "Bearer expert-token-1"),)
Req = feedback_pb2.SubmitFeedbackRequest


class FakeProducer:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, events_pb2.Feedback]] = []
        self.fail = False

    async def produce(self, topic: str, key: str, message: Any, headers: Any = None) -> None:
        if self.fail:
            raise Unavailable("down")
        self.events.append((topic, key, message))


class FakeContext:
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


@pytest.fixture
def producer() -> FakeProducer:
    return FakeProducer()


@pytest.fixture
def signer() -> QueryIdSigner:
    return QueryIdSigner(KEY)


def make_servicer(producer: FakeProducer, **overrides: Any) -> FeedbackServicer:
    settings = FeedbackSettings(**overrides)
    return FeedbackServicer(
        settings,
        producer=producer,  # type: ignore[arg-type]
        authenticator=Authenticator({"user-token-1": "user", "expert-token-1": "expert"}),
        redactor=Redactor(presidio=False),
        signer=QueryIdSigner(KEY, max_age_s=settings.validation.query_id_max_age_s),
        pseudonym_key=PSEUDONYM_KEY,
    )


@pytest.fixture
def servicer(producer: FakeProducer) -> FeedbackServicer:
    return make_servicer(producer)


async def test_rating_is_stored_with_pseudonymous_ids(
    servicer: FeedbackServicer, producer: FakeProducer, signer: QueryIdSigner
) -> None:
    query_id = signer.issue("v7")
    # A client may put anything in its idempotency key: the event carries only the keyed id.
    key_text = "retry-of-jane.doe@example.com"
    request = feedback_pb2.SubmitFeedbackRequest(
        query_id=query_id, rating=4, session_id="sess-1", idempotency_key=key_text
    )
    response = await servicer.SubmitFeedback(request, FakeContext(USER))  # type: ignore[arg-type]
    assert not response.duplicate
    [(topic, key, event)] = producer.events
    assert topic == "flywheel.feedback.v1"
    assert key == query_id
    assert event.feedback_id == response.feedback_id
    assert event.kind == events_pb2.FEEDBACK_KIND_RATING and event.value == 4
    assert event.model_version == "v7"
    assert event.reviewer_role == events_pb2.REVIEWER_ROLE_USER
    assert event.submitter_pseudonym == pseudonymise(PSEUDONYM_KEY, "sess-1", domain="session")
    for raw in ("sess-1", key_text):
        assert raw not in event.SerializeToString().decode(errors="replace")


async def test_feedback_counts_as_the_session_the_signed_query_id_names(
    servicer: FeedbackServicer, producer: FakeProducer, signer: QueryIdSigner
) -> None:
    asker = pseudonymise(PSEUDONYM_KEY, "asker", domain="session")
    query_id = signer.issue("v7", asker)
    # Another session id, or none: the vote is still the asker's, so one visitor cannot pass for many.
    for i, session in enumerate(["someone-else", ""]):
        request = feedback_pb2.SubmitFeedbackRequest(
            query_id=query_id, thumbs_up=False, session_id=session, idempotency_key=f"key-{i}"
        )
        await servicer.SubmitFeedback(request, FakeContext(USER))  # type: ignore[arg-type]
    assert [event.submitter_pseudonym for _, _, event in producer.events] == [asker, asker]
    # An expert's correction is the expert's own, not the asker's.
    correction = feedback_pb2.SubmitCorrectionRequest(query_id=query_id, corrected_answer="Right.")
    await servicer.SubmitCorrection(correction, FakeContext(EXPERT))  # type: ignore[arg-type]
    assert producer.events[-1][2].submitter_pseudonym not in ("", asker)
    # So is an expert's rating (accepting the answer in the review console).
    accept = feedback_pb2.SubmitFeedbackRequest(query_id=query_id, rating=5, idempotency_key="accept")
    await servicer.SubmitFeedback(accept, FakeContext(EXPERT))  # type: ignore[arg-type]
    assert producer.events[-1][2].submitter_pseudonym not in ("", asker)
    assert producer.events[-1][2].reviewer_role == events_pb2.REVIEWER_ROLE_EXPERT


@pytest.mark.parametrize(
    ("fields", "kind", "value"),
    [
        ({"thumbs_up": True}, events_pb2.FEEDBACK_KIND_THUMBS, 1),
        ({"thumbs_up": False}, events_pb2.FEEDBACK_KIND_THUMBS, -1),
        ({"ignored": True}, events_pb2.FEEDBACK_KIND_IGNORED, 0),
    ],
)
async def test_signals(
    servicer: FeedbackServicer,
    producer: FakeProducer,
    signer: QueryIdSigner,
    fields: dict[str, Any],
    kind: int,
    value: int,
) -> None:
    request = feedback_pb2.SubmitFeedbackRequest(query_id=signer.issue("v1"), **fields)
    await servicer.SubmitFeedback(request, FakeContext(USER))  # type: ignore[arg-type]
    assert (producer.events[0][2].kind, producer.events[0][2].value) == (kind, value)


async def test_comment_is_redacted(
    servicer: FeedbackServicer, producer: FakeProducer, signer: QueryIdSigner
) -> None:
    comment = "Wrong! Write to jane@example.com or call +1 415-555-0132."
    request = feedback_pb2.SubmitFeedbackRequest(query_id=signer.issue("v1"), comment=comment)
    await servicer.SubmitFeedback(request, FakeContext(USER))  # type: ignore[arg-type]
    assert producer.events[0][2].redacted_text == "Wrong! Write to [EMAIL] or call [PHONE]."


async def test_control_escape_and_bidi_characters_never_reach_kafka(
    servicer: FeedbackServicer, producer: FakeProducer, signer: QueryIdSigner
) -> None:
    comment = "Wr\x00ong \x1b[31manswer\x1b[0m\u202e, see\r\nthe page"
    request = feedback_pb2.SubmitFeedbackRequest(query_id=signer.issue("v1"), comment=comment)
    await servicer.SubmitFeedback(request, FakeContext(USER))  # type: ignore[arg-type]
    assert producer.events[0][2].redacted_text == "Wrong answer, see\nthe page"
    only_controls = feedback_pb2.SubmitFeedbackRequest(query_id=signer.issue("v1"), comment="\x00\x1b[0m")
    with pytest.raises(InvalidArgument, match="comment must not be empty"):
        await servicer.SubmitFeedback(only_controls, FakeContext(USER))  # type: ignore[arg-type]
    bad_session = feedback_pb2.SubmitFeedbackRequest(
        query_id=signer.issue("v1"), rating=3, session_id="a\x00"
    )
    with pytest.raises(InvalidArgument, match="session_id must not contain control"):
        await servicer.SubmitFeedback(bad_session, FakeContext(USER))  # type: ignore[arg-type]


async def test_correction_needs_an_expert(
    servicer: FeedbackServicer, producer: FakeProducer, signer: QueryIdSigner
) -> None:
    request = feedback_pb2.SubmitCorrectionRequest(
        query_id=signer.issue("v1"), corrected_answer="It is 324 m, see 10.1.2.3", note="checked"
    )
    with pytest.raises(PermissionDenied):
        await servicer.SubmitCorrection(request, FakeContext(USER))  # type: ignore[arg-type]
    assert not producer.events
    await servicer.SubmitCorrection(request, FakeContext(EXPERT))  # type: ignore[arg-type]
    event = producer.events[0][2]
    assert event.kind == events_pb2.FEEDBACK_KIND_CORRECTION
    assert event.redacted_text == "It is 324 m, see [IP]"
    assert event.redacted_note == "checked"
    assert event.reviewer_role == events_pb2.REVIEWER_ROLE_EXPERT


def _forged() -> str:
    return QueryIdSigner(b"someone-elses-key-0000").issue("v1")


@pytest.mark.parametrize(
    ("make_request", "error", "message"),
    [
        (lambda s: Req(rating=3), InvalidArgument, "query_id is required"),
        (lambda s: Req(query_id="abc", rating=3), InvalidArgument, "malformed"),
        (lambda s: Req(query_id="q" * 257, rating=3), InvalidArgument, "query_id is longer than 256"),
        (
            lambda s: Req(query_id=s.issue("v"), rating=2, session_id="s" * 257),
            InvalidArgument,
            "session_id is longer than 256",
        ),
        (
            lambda s: Req(query_id=s.issue("v"), rating=2, idempotency_key="k" * 129),
            InvalidArgument,
            "idempotency_key",
        ),
        (
            lambda s: Req(query_id=_forged(), rating=3),
            InvalidArgument,
            "not issued",
        ),
        (
            lambda s: Req(query_id=s.issue("v", now=0), rating=3),
            InvalidArgument,
            "expired",
        ),
        (lambda s: Req(query_id=s.issue("v"), rating=0), InvalidArgument, "rating"),
        (lambda s: Req(query_id=s.issue("v"), rating=6), InvalidArgument, "rating"),
        (lambda s: Req(query_id=s.issue("v")), InvalidArgument, "one of"),
        (
            lambda s: Req(query_id=s.issue("v"), comment="   "),
            InvalidArgument,
            "comment must not be empty",
        ),
        (
            lambda s: Req(query_id=s.issue("v"), comment="x" * 2001),
            InvalidArgument,
            "longer than 2000",
        ),
        (
            lambda s: Req(query_id=s.issue("v"), ignored=False),
            InvalidArgument,
            "ignored",
        ),
        (
            lambda s: Req(query_id=s.issue("v"), rating=2, idempotency_key="a b"),
            InvalidArgument,
            "idempotency_key",
        ),
    ],
)
async def test_bad_feedback_is_refused(
    servicer: FeedbackServicer,
    producer: FakeProducer,
    signer: QueryIdSigner,
    make_request: Any,
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        await servicer.SubmitFeedback(make_request(signer), FakeContext(USER))  # type: ignore[arg-type]
    assert not producer.events


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"corrected_answer": ""}, "corrected_answer must not be empty"),
        ({"corrected_answer": "x" * 8001}, "longer than 8000"),
        ({"corrected_answer": "ok", "note": "n" * 2001}, "note is longer"),
    ],
)
async def test_bad_corrections_are_refused(
    servicer: FeedbackServicer,
    producer: FakeProducer,
    signer: QueryIdSigner,
    fields: dict[str, str],
    message: str,
) -> None:
    request = feedback_pb2.SubmitCorrectionRequest(query_id=signer.issue("v"), **fields)
    with pytest.raises(InvalidArgument, match=message):
        await servicer.SubmitCorrection(request, FakeContext(EXPERT))  # type: ignore[arg-type]
    assert not producer.events


async def test_no_token(servicer: FeedbackServicer, producer: FakeProducer, signer: QueryIdSigner) -> None:
    request = feedback_pb2.SubmitFeedbackRequest(query_id=signer.issue("v"), rating=3)
    with pytest.raises(Unauthenticated):
        await servicer.SubmitFeedback(request, FakeContext(()))  # type: ignore[arg-type]
    assert not producer.events


async def test_duplicates_are_answered_without_storing(
    servicer: FeedbackServicer, producer: FakeProducer, signer: QueryIdSigner
) -> None:
    request = feedback_pb2.SubmitFeedbackRequest(query_id=signer.issue("v"), rating=5, idempotency_key="k-1")
    first = await servicer.SubmitFeedback(request, FakeContext(USER))  # type: ignore[arg-type]
    again = await servicer.SubmitFeedback(request, FakeContext(USER))  # type: ignore[arg-type]
    assert (first.duplicate, again.duplicate) == (False, True)
    assert first.feedback_id == again.feedback_id
    assert len(producer.events) == 1
    # The same key from another caller is its own submission.
    other = await servicer.SubmitFeedback(request, FakeContext(EXPERT))  # type: ignore[arg-type]
    assert not other.duplicate and other.feedback_id != first.feedback_id


async def test_unavailable_when_kafka_fails_and_the_retry_stores(
    servicer: FeedbackServicer, producer: FakeProducer, signer: QueryIdSigner
) -> None:
    request = feedback_pb2.SubmitFeedbackRequest(query_id=signer.issue("v"), rating=5, idempotency_key="k-2")
    producer.fail = True
    with pytest.raises(Unavailable, match="retry"):
        await servicer.SubmitFeedback(request, FakeContext(USER))  # type: ignore[arg-type]
    producer.fail = False
    response = await servicer.SubmitFeedback(request, FakeContext(USER))  # type: ignore[arg-type]
    assert not response.duplicate
    assert len(producer.events) == 1


async def test_rate_limit(producer: FakeProducer, signer: QueryIdSigner) -> None:
    servicer = make_servicer(producer, rate_limit={"per_second": 1, "burst": 2})
    request = feedback_pb2.SubmitFeedbackRequest(query_id=signer.issue("v"), thumbs_up=True)
    for _ in range(2):
        await servicer.SubmitFeedback(request, FakeContext(USER))  # type: ignore[arg-type]
    with pytest.raises(ResourceExhausted):
        await servicer.SubmitFeedback(request, FakeContext(USER))  # type: ignore[arg-type]
    await servicer.SubmitFeedback(request, FakeContext(EXPERT))  # type: ignore[arg-type]
    assert len(producer.events) == 3


async def test_rate_limit_is_per_visitor_session_behind_one_token(
    producer: FakeProducer, signer: QueryIdSigner
) -> None:
    """The gateway relays every visitor on one token: one visitor's burst leaves the others'
    feedback alone, and ids without a session or forged ones share the token's bucket."""
    servicer = make_servicer(producer, rate_limit={"per_second": 1, "burst": 2})

    def rate(query_id: str) -> Any:
        request = feedback_pb2.SubmitFeedbackRequest(query_id=query_id, rating=1)
        return servicer.SubmitFeedback(request, FakeContext(USER))  # type: ignore[arg-type]

    noisy, quiet = signer.issue("v", "aa" * 8), signer.issue("v", "bb" * 8)
    for _ in range(2):
        await rate(noisy)
    with pytest.raises(ResourceExhausted):
        await rate(noisy)
    await rate(quiet)
    await rate(signer.issue("v"))
    with pytest.raises(InvalidArgument):
        await rate("not-a-query-id")
    with pytest.raises(ResourceExhausted):
        await rate("not-a-query-id")
    assert len(producer.events) == 4


async def test_redaction_runs_off_the_event_loop(
    servicer: FeedbackServicer, producer: FakeProducer, signer: QueryIdSigner
) -> None:
    threads: list[threading.Thread] = []
    redactor = servicer._redactor
    real = redactor.redact

    def spy(text: str) -> Any:
        threads.append(threading.current_thread())
        return real(text)

    redactor.redact = spy  # type: ignore[method-assign]
    request = feedback_pb2.SubmitCorrectionRequest(
        query_id=signer.issue("v1"), corrected_answer="Mail jane@example.com", note="from 10.0.0.1"
    )
    await servicer.SubmitCorrection(request, FakeContext(EXPERT))  # type: ignore[arg-type]
    assert len(threads) == 2 and threading.main_thread() not in threads
    assert (producer.events[0][2].redacted_text, producer.events[0][2].redacted_note) == (
        "Mail [EMAIL]",
        "from [IP]",
    )
