"""The feedback service over real gRPC and a real broker: stored, redacted, refused, deduplicated, durable."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kafka.consumer.fetcher import ConsumerRecord
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from flywheel_cli.local.kafka_broker import LocalBroker
from flywheel_common.dev_secrets import DEV_PSEUDONYM_KEY, DEV_QUERY_ID_KEY
from flywheel_common.kafka import EVENT_TYPE_HEADER, decode, header
from flywheel_common.pseudonym import pseudonymise
from flywheel_common.query_ids import QueryIdSigner
from flywheel_common.settings import GrpcSettings, KafkaSettings, MetricsSettings
from flywheel_feedback.app import FeedbackApp
from flywheel_feedback.redaction import Redactor
from flywheel_feedback.settings import FeedbackSettings
from flywheel_proto.flywheel.events.v1 import events_pb2
from flywheel_proto.flywheel.feedback.v1 import feedback_pb2, feedback_pb2_grpc

pytestmark = pytest.mark.integration

USER = (("authorization", "Bearer dev-user-token"),)
EXPERT = (("authorization", "Bearer dev-expert-token"),)
Req = feedback_pb2.SubmitFeedbackRequest
Correction = feedback_pb2.SubmitCorrectionRequest


@pytest.fixture(scope="session")
def redactor() -> Redactor:
    return Redactor()


@pytest.fixture(scope="session", autouse=True)
def tracing() -> None:
    """An SDK tracer provider (no exporter), as main() installs, so trace context propagates."""
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(TracerProvider())


@pytest.fixture
def signer() -> QueryIdSigner:
    return QueryIdSigner(DEV_QUERY_ID_KEY)


Starter = Callable[..., Awaitable[feedback_pb2_grpc.FeedbackServiceStub]]


@pytest.fixture
async def start_feedback(kafka_settings: KafkaSettings, redactor: Redactor) -> AsyncIterator[Starter]:
    """Starts feedback services on loopback (stopped after the test); returns a stub for each."""
    apps: list[FeedbackApp] = []
    channels: list[grpc.aio.Channel] = []

    async def start(**overrides: Any) -> feedback_pb2_grpc.FeedbackServiceStub:
        settings = FeedbackSettings(
            grpc=GrpcSettings(port=0, grace_s=1),
            metrics=MetricsSettings(port=0),
            kafka=kafka_settings,
            **{"rate_limit": {"per_second": 0}, **overrides},
        )
        app = FeedbackApp(settings, redactor=redactor)
        port = await app.start()
        apps.append(app)
        await asyncio.wait_for(app.ready.wait(), 30)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        start.port = port  # type: ignore[attr-defined]
        start.channel = channel  # type: ignore[attr-defined]
        return feedback_pb2_grpc.FeedbackServiceStub(channel)

    yield start
    for channel in channels:
        await channel.close()
    for app in apps:
        await app.stop(1)


async def test_feedback_is_on_the_topic_redacted_and_pseudonymous(
    start_feedback: Starter,
    kafka_settings: KafkaSettings,
    signer: QueryIdSigner,
    read_topic: Callable[..., list[ConsumerRecord]],
) -> None:
    stub = await start_feedback()
    health = health_pb2_grpc.HealthStub(start_feedback.channel)  # type: ignore[attr-defined]
    status = await health.Check(health_pb2.HealthCheckRequest(service="flywheel.feedback.v1.FeedbackService"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING

    query_id = signer.issue("base-v1")
    comment = "Wrong. Mail me at jane.doe@example.com or call +1 415-555-0132, card 4111 1111 1111 1111."
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = ("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01")
    response = await stub.SubmitFeedback(
        Req(query_id=query_id, comment=comment, session_id="visitor-session-42"),
        metadata=(*USER, traceparent),
    )
    correction = await stub.SubmitCorrection(
        Correction(query_id=query_id, corrected_answer="It is 324 m tall.", note="Source: 10.20.30.40"),
        metadata=EXPERT,
    )

    records = read_topic(kafka_settings.topics.feedback, 2)
    assert len(records) == 2
    by_id = {decode(r, events_pb2.Feedback).feedback_id: r for r in records}
    record = by_id[response.feedback_id]
    assert record.key == query_id.encode()
    assert header(record, EVENT_TYPE_HEADER) == b"flywheel.events.v1.Feedback"
    # The caller's trace continues in the event's headers.
    assert trace_id.encode() in (header(record, "traceparent") or b"")
    event = decode(record, events_pb2.Feedback)
    assert event.kind == events_pb2.FEEDBACK_KIND_COMMENT
    assert event.redacted_text == "Wrong. Mail me at [EMAIL] or call [PHONE], card [CARD]."
    assert event.model_version == "base-v1"
    assert event.submitter_pseudonym == pseudonymise(
        DEV_PSEUDONYM_KEY, "visitor-session-42", domain="session"
    )
    raw = record.value + b"".join(v or b"" for _, v in record.headers)
    for secret in (b"jane.doe", b"415-555", b"4111", b"visitor-session-42", b"dev-user-token"):
        assert secret not in raw
    fix = decode(by_id[correction.feedback_id], events_pb2.Feedback)
    assert fix.kind == events_pb2.FEEDBACK_KIND_CORRECTION
    assert fix.reviewer_role == events_pb2.REVIEWER_ROLE_EXPERT
    assert (fix.redacted_text, fix.redacted_note) == ("It is 324 m tall.", "Source: [IP]")


async def test_every_bad_input_gets_its_status_and_nothing_is_produced(
    start_feedback: Starter,
    kafka_settings: KafkaSettings,
    signer: QueryIdSigner,
    topic_count: Callable[[str], int],
) -> None:
    stub = await start_feedback(rate_limit={"per_second": 0.01, "burst": 20})
    forged = QueryIdSigner(b"not-the-shared-key-000").issue("v1")
    good = signer.issue("v1")
    code = grpc.StatusCode
    cases: list[tuple[str, Any, Any, tuple[tuple[str, str], ...], grpc.StatusCode]] = [
        ("no token", stub.SubmitFeedback, Req(query_id=good, rating=3), (), code.UNAUTHENTICATED),
        (
            "unknown token",
            stub.SubmitFeedback,
            Req(query_id=good, rating=3),
            (("authorization", "Bearer guess-guess"),),
            code.UNAUTHENTICATED,
        ),
        (
            "user correction",
            stub.SubmitCorrection,
            Correction(query_id=good, corrected_answer="x"),
            USER,
            code.PERMISSION_DENIED,
        ),
        ("forged query id", stub.SubmitFeedback, Req(query_id=forged, rating=3), USER, code.INVALID_ARGUMENT),
        ("bad query id", stub.SubmitFeedback, Req(query_id="q1.x", rating=3), USER, code.INVALID_ARGUMENT),
        (
            "expired query id",
            stub.SubmitFeedback,
            Req(query_id=signer.issue("v1", now=time.time() - 31 * 24 * 3600), rating=3),
            USER,
            code.INVALID_ARGUMENT,
        ),
        ("rating 0", stub.SubmitFeedback, Req(query_id=good, rating=0), USER, code.INVALID_ARGUMENT),
        ("rating 6", stub.SubmitFeedback, Req(query_id=good, rating=6), USER, code.INVALID_ARGUMENT),
        ("no signal", stub.SubmitFeedback, Req(query_id=good), USER, code.INVALID_ARGUMENT),
        ("empty comment", stub.SubmitFeedback, Req(query_id=good, comment=" "), USER, code.INVALID_ARGUMENT),
        (
            "long comment",
            stub.SubmitFeedback,
            Req(query_id=good, comment="x" * 2001),
            USER,
            code.INVALID_ARGUMENT,
        ),
        (
            "empty correction",
            stub.SubmitCorrection,
            Correction(query_id=good, corrected_answer=""),
            EXPERT,
            code.INVALID_ARGUMENT,
        ),
    ]
    for name, rpc, request, metadata, expected in cases:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await rpc(request, metadata=metadata)
        assert error.value.code() == expected, name
        assert error.value.details(), name
    # The expert token has a burst of 20 and refills once in 100 s.
    for _ in range(19):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.SubmitCorrection(Correction(query_id=good, corrected_answer=""), metadata=EXPERT)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.SubmitCorrection(Correction(query_id=good, corrected_answer="ok"), metadata=EXPERT)
    assert error.value.code() == code.RESOURCE_EXHAUSTED
    assert topic_count(kafka_settings.topics.feedback) == 0


async def test_duplicates_are_stored_once(
    start_feedback: Starter,
    kafka_settings: KafkaSettings,
    signer: QueryIdSigner,
    read_topic: Callable[..., list[ConsumerRecord]],
    topic_count: Callable[[str], int],
) -> None:
    stub = await start_feedback()
    request = Req(query_id=signer.issue("v1"), thumbs_up=True, idempotency_key="click-7f3a")
    first = await stub.SubmitFeedback(request, metadata=USER)
    retries = await asyncio.gather(*(stub.SubmitFeedback(request, metadata=USER) for _ in range(5)))
    assert not first.duplicate
    assert all(r.duplicate and r.feedback_id == first.feedback_id for r in retries)
    # A new key is a new signal.
    other = await stub.SubmitFeedback(
        Req(query_id=request.query_id, thumbs_up=True, idempotency_key="click-8b21"), metadata=USER
    )
    assert not other.duplicate
    records = read_topic(kafka_settings.topics.feedback, 2)
    assert sorted(decode(r, events_pb2.Feedback).feedback_id for r in records) == sorted(
        [first.feedback_id, other.feedback_id]
    )
    assert topic_count(kafka_settings.topics.feedback) == 2


async def test_broker_stopped_during_a_burst_loses_no_acknowledged_feedback(
    start_feedback: Starter,
    kafka_broker: LocalBroker,
    kafka_settings: KafkaSettings,
    signer: QueryIdSigner,
    read_topic: Callable[..., list[ConsumerRecord]],
) -> None:
    stub = await start_feedback(produce_timeout_ms=2000)
    query_id = signer.issue("v1")
    ok: list[str] = []
    errors: dict[str, int] = {}
    stop = asyncio.Event()
    recovered = asyncio.Event()
    target = [0]  # OKs to reach after the restart; 0 until then

    async def client(worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            request = Req(query_id=query_id, rating=1 + n % 5, idempotency_key=f"w{worker}-{n}")
            try:
                response = await stub.SubmitFeedback(request, metadata=USER, timeout=10)
                ok.append(response.feedback_id)
                if target[0] and len(ok) >= target[0]:
                    recovered.set()
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                await asyncio.sleep(0.05)

    workers = [asyncio.create_task(client(w)) for w in range(16)]
    try:
        await asyncio.sleep(1.5)
        acked_before = len(ok)
        await asyncio.to_thread(kafka_broker.stop, kill=True)
        await asyncio.sleep(3)
        await asyncio.to_thread(kafka_broker.start)
        acked_at_restart = len(ok)
        target[0] = acked_at_restart + 200
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(recovered.wait(), 20)
    finally:
        stop.set()
        await asyncio.gather(*workers)
        if kafka_broker.pid is None:
            kafka_broker.start()
    after = len(ok) - acked_at_restart
    print(f"acknowledged {len(ok)} ({acked_before} before the crash, {after} after restart), errors {errors}")
    assert acked_before > 0
    assert len(ok) >= acked_at_restart + 200, "the service did not recover after the restart"
    assert errors and set(errors) == {"UNAVAILABLE"}, errors
    records = read_topic(kafka_settings.topics.feedback, len(ok))
    stored = {decode(r, events_pb2.Feedback).feedback_id for r in records}
    missing = set(ok) - stored
    assert not missing, f"{len(missing)} acknowledged feedback events are not on the topic"


async def test_not_serving_until_kafka_is_reachable(redactor: Redactor, tmp_path: Path) -> None:
    broker = LocalBroker(data_dir=tmp_path / "kafka", stop_with_parent=True)  # not started yet
    settings = FeedbackSettings(
        grpc=GrpcSettings(port=0, grace_s=1),
        metrics=MetricsSettings(port=0),
        kafka=KafkaSettings(bootstrap_servers=broker.bootstrap_servers, request_timeout_ms=2000),
    )
    app = FeedbackApp(settings, redactor=redactor)
    port = await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await asyncio.sleep(1)
            status = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await asyncio.to_thread(broker.start)
            await asyncio.wait_for(app.ready.wait(), 30)
            status = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await app.stop(1)
        await asyncio.to_thread(broker.close)
