"""Every RPC of every service, fed valid-but-hostile values for every field, answers its documented
status code, never a server error, and keeps answering healthy requests during and after.

For each string field: empty, control/escape/bidi characters, exactly its limit, one past it and ten
times it; the field as invalid UTF-8 on the wire; an unknown field; a deadline of 0. Within a limit
any client-side code is fine (INVALID_ARGUMENT, NOT_FOUND, ...) but never INTERNAL or UNKNOWN; past a
documented limit, and as invalid UTF-8, the answer is INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from flywheel_security import ADMIN, EXPERT, INFERENCE_LIMITS, USER, Service
from google.protobuf.message import Message

from flywheel_common.query_ids import QueryIdSigner
from flywheel_proto.flywheel.evaluator.v1 import evaluator_pb2
from flywheel_proto.flywheel.feedback.v1 import feedback_pb2
from flywheel_proto.flywheel.inference.v1 import inference_pb2
from flywheel_proto.flywheel.trainer.v1 import trainer_pb2

pytestmark = [pytest.mark.security, pytest.mark.integration]

SERVER_ERRORS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
HOSTILE_TEXT = "\x00nul \x1b[31mred\x1b[0m \u202eevil\u202c \u2066iso\u2069 \r\nline\u2028sep"
L = INFERENCE_LIMITS
Feedback = feedback_pb2.SubmitFeedbackRequest
Correction = feedback_pb2.SubmitCorrectionRequest
SERVICES = {
    "inference": ("flywheel.inference.v1", "InferenceService"),
    "feedback": ("flywheel.feedback.v1", "FeedbackService"),
    "trainer": ("flywheel.trainer.v1", "TrainerService"),
    "evaluator": ("flywheel.evaluator.v1", "EvaluatorService"),
}


@dataclass
class Rpc:
    """One RPC: a valid request, and its string fields (a dotted path) with their documented limit."""

    service: str
    method: str
    request: Callable[[QueryIdSigner], Message]
    fields: dict[str, int | None]
    metadata: tuple[tuple[str, str], ...] = ()
    streaming: bool = False
    # Fields whose hostile values need a request with another signal set (the oneof's member).
    requests: dict[str, Callable[[QueryIdSigner], Message]] = field(default_factory=dict)


def _answer(_: QueryIdSigner) -> Message:
    return inference_pb2.AnswerRequest(
        page=inference_pb2.Page(url="https://example.org/", title="Lamps", text="Lamp 3 is purple."),
        question="What colour is lamp 3?",
        session_id="s1",
        options=inference_pb2.GenerationOptions(max_new_tokens=1),
    )


def _html_answer(s: QueryIdSigner) -> Message:
    request = _answer(s)
    request.page.html = "<p>Lamp 3 is purple.</p>"  # type: ignore[attr-defined]
    return request


INFERENCE_FIELDS: dict[str, int | None] = {
    "question": L.max_question_chars,
    "session_id": L.max_session_id_chars,
    # An address block in CIDR notation: anything else, and anything longer, is refused.
    "client_network": 64,
    "page.url": L.max_url_chars,
    "page.title": L.max_title_chars,
    "page.text": L.max_page_bytes,
    "page.html": L.max_page_bytes,
}

RPCS = [
    Rpc("inference", "Answer", _answer, INFERENCE_FIELDS, requests={"page.html": _html_answer}),
    # The same validation as Answer (every field there); here the fields whose refusal or answer
    # streams, to keep the tier near a minute on two cores.
    Rpc(
        "inference",
        "StreamAnswer",
        _answer,
        {"question": L.max_question_chars, "page.html": L.max_page_bytes},
        streaming=True,
        requests={"page.html": _html_answer},
    ),
    Rpc(
        "feedback",
        "SubmitFeedback",
        lambda s: Feedback(query_id=s.issue("v1"), rating=4),
        {"query_id": 256, "comment": 2000, "idempotency_key": 128, "session_id": 256},
        metadata=USER,
        requests={
            "comment": lambda s: feedback_pb2.SubmitFeedbackRequest(query_id=s.issue("v1"), comment="ok")
        },
    ),
    Rpc(
        "feedback",
        "SubmitCorrection",
        lambda s: feedback_pb2.SubmitCorrectionRequest(
            query_id=s.issue("v1"), corrected_answer="It is purple."
        ),
        {"query_id": 256, "corrected_answer": 8000, "note": 2000, "idempotency_key": 128},
        metadata=EXPERT,
    ),
    Rpc("trainer", "ListJobs", lambda s: trainer_pb2.ListJobsRequest(limit=2**32 - 1), {}),
    Rpc("trainer", "GetJob", lambda s: trainer_pb2.GetJobRequest(job_id="job-x"), {"job_id": 128}),
    Rpc("trainer", "TriggerBatch", lambda s: trainer_pb2.TriggerBatchRequest(), {}, metadata=ADMIN),
    Rpc(
        "trainer",
        "ForgetSession",
        lambda s: trainer_pb2.ForgetSessionRequest(session_id="visitor-1", reason="fuzz"),
        {"session_id": 256, "reason": 1000},
        metadata=ADMIN,
    ),
    Rpc("evaluator", "GetRollout", lambda s: evaluator_pb2.GetRolloutRequest(), {}),
    Rpc("evaluator", "ListDecisions", lambda s: evaluator_pb2.ListDecisionsRequest(limit=2**32 - 1), {}),
    Rpc("evaluator", "GetReport", lambda s: evaluator_pb2.GetReportRequest(version="v1"), {"version": 128}),
    Rpc(
        "evaluator",
        "Evaluate",
        lambda s: evaluator_pb2.EvaluateRequest(version="v-none"),
        {"version": 128},
        metadata=ADMIN,
    ),
    *(
        Rpc(
            "evaluator",
            name,
            lambda s: evaluator_pb2.VersionRequest(version="v2", reason="fuzz"),
            {"version": 128, "reason": 1000},
            metadata=ADMIN,
        )
        for name in ("Pin", "Promote", "Rollback")
    ),
    Rpc(
        "evaluator",
        "SetAutoRollout",
        lambda s: evaluator_pb2.SetAutoRolloutRequest(enabled=True),
        {},
        metadata=ADMIN,
    ),
    Rpc(
        "evaluator",
        "ForgetSession",
        lambda s: evaluator_pb2.ForgetSessionRequest(session_id="visitor-1"),
        {"session_id": 256},
        metadata=ADMIN,
    ),
]


def _set(message: Message, path: str, value: str) -> None:
    *parents, name = path.split(".")
    for parent in parents:
        message = getattr(message, parent)
    setattr(message, name, value)


def _field_number(message: Message, path: str) -> list[int]:
    numbers = []
    descriptor: Any = message.DESCRIPTOR
    for name in path.split("."):
        f = descriptor.fields_by_name[name]
        numbers.append(f.number)
        descriptor = f.message_type
    return numbers


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def invalid_utf8(message: Message, path: str) -> bytes:
    """The message with the field at `path` set, on the wire, to bytes that are not UTF-8."""
    numbers = _field_number(message, path)
    payload = b"ok \xff\xfe\xc3"
    for number in reversed(numbers):
        payload = _length_delimited(number, payload)
    return message.SerializeToString() + payload


def hostile_values(limit: int | None) -> list[tuple[str, bool]]:
    """(value, whether it is past the field's documented limit)."""
    values = [("", False), (HOSTILE_TEXT, False)]
    if limit is not None:
        values += [("x" * limit, False), ("y" * (limit + 1), True), ("z" * (limit * 10), True)]
    return values


async def call(
    service: Service, rpc: Rpc, request: Message | bytes, deadline_s: float = 60
) -> grpc.StatusCode:
    """The status code the RPC answers (raw bytes for what the message API cannot express)."""
    package, name = SERVICES[service.name]
    path = f"/{package}.{name}/{rpc.method}"
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    try:
        if rpc.streaming:
            stream = service.channel.unary_stream(path, request_serializer=bytes, response_deserializer=bytes)
            async for _ in stream(raw, metadata=rpc.metadata, timeout=deadline_s):
                pass
        else:
            unary = service.channel.unary_unary(path, request_serializer=bytes, response_deserializer=bytes)
            await unary(raw, metadata=rpc.metadata, timeout=deadline_s)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def keep_healthy(service: Service, stop: asyncio.Event) -> int:
    """Healthy calls, one after another, until `stop`; every one must succeed."""
    done = 0
    while not stop.is_set() or done == 0:
        await service.healthy()
        done += 1
        # Paced, so the hostile calls are not starved (every healthy call must still succeed).
        await asyncio.sleep(0.5)
    return done


def _rpcs(service: str) -> Any:
    return pytest.mark.parametrize("rpc", [r for r in RPCS if r.service == service], ids=lambda r: r.method)


@_rpcs("inference")
async def test_inference(rpc: Rpc, inference: Service, signer: QueryIdSigner) -> None:
    await fuzz(inference, rpc, signer)


@_rpcs("feedback")
async def test_feedback(rpc: Rpc, feedback: Service, signer: QueryIdSigner) -> None:
    await fuzz(feedback, rpc, signer)


@_rpcs("trainer")
async def test_trainer(rpc: Rpc, trainer: Service, signer: QueryIdSigner) -> None:
    await fuzz(trainer, rpc, signer)


@_rpcs("evaluator")
async def test_evaluator(rpc: Rpc, evaluator: Service, signer: QueryIdSigner) -> None:
    await fuzz(evaluator, rpc, signer)


async def fuzz(service: Service, rpc: Rpc, signer: QueryIdSigner) -> None:
    """Every hostile value of every field of `rpc`, with healthy calls running beside them."""
    failures: list[str] = []
    stop = asyncio.Event()
    healthy = asyncio.create_task(keep_healthy(service, stop))
    try:
        for path, limit in rpc.fields.items():
            make = rpc.requests.get(path, rpc.request)
            for value, past_limit in hostile_values(limit):
                message = make(signer)
                _set(message, path, value)
                code = await call(service, rpc, message)
                wanted = "INVALID_ARGUMENT" if past_limit else "a client-side code"
                if code in SERVER_ERRORS or (past_limit and code != grpc.StatusCode.INVALID_ARGUMENT):
                    failures.append(f"{path}={value[:12]!r}x{len(value)}: {code.name}, wanted {wanted}")
            code = await call(service, rpc, invalid_utf8(make(signer), path))
            if code != grpc.StatusCode.INVALID_ARGUMENT:
                failures.append(f"{path} as invalid UTF-8: {code.name}, wanted INVALID_ARGUMENT")
        # Unknown fields are skipped, as proto3 says: the valid request is answered as without them.
        valid = rpc.request(signer).SerializeToString()
        expected = await call(service, rpc, rpc.request(signer))
        unknown = valid + _length_delimited(999, b"\x00\xff") + _varint(998 << 3) + _varint(2**40)
        if (code := await call(service, rpc, unknown)) != expected:
            failures.append(f"unknown fields: {code.name}, wanted {expected.name}")
        if expected in SERVER_ERRORS:
            failures.append(f"the valid request: {expected.name}")
        if (code := await call(service, rpc, b"\xff\xff\xff\xff")) != grpc.StatusCode.INVALID_ARGUMENT:
            failures.append(f"a corrupt body: {code.name}, wanted INVALID_ARGUMENT")
        # gRPC may still deliver a call whose deadline is now; then it is answered as usual.
        code = await call(service, rpc, rpc.request(signer), deadline_s=0)
        if code not in (grpc.StatusCode.DEADLINE_EXCEEDED, expected):
            failures.append(f"a deadline of 0: {code.name}, wanted DEADLINE_EXCEEDED or {expected.name}")
    finally:
        stop.set()
        answered = await healthy
    assert not failures, "\n".join(failures)
    assert answered >= 1
    await service.healthy()  # and after
