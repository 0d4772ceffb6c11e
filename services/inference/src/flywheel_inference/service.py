"""The InferenceService servicer: validation, routing to a model version, streaming, logging."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from flywheel_common.auth import Authenticator
from flywheel_common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from flywheel_common.grpc_server import request_metadata
from flywheel_common.networks import client_network, peer_host
from flywheel_common.pseudonym import pseudonymise
from flywheel_common.query_ids import QueryIdSigner
from flywheel_common.settings import EvidenceSettings
from flywheel_common.text import clean_text, has_unsafe
from flywheel_inference.metrics import ANSWERS, DURATION, QUEUE_DEPTH, TOKENS, TTFT
from flywheel_inference.router import ModelRouter
from flywheel_inference.settings import LimitSettings
from flywheel_model.generation import QueueFull, SamplingParams
from flywheel_model.prompt import IncrementalDetokenizer, PromptTooLong
from flywheel_model.retrieval import PageNotIndexable, Passage, html_to_text, normalise_text
from flywheel_proto.flywheel.events.v1 import events_pb2
from flywheel_proto.flywheel.inference.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)


class InteractionSink(Protocol):
    """Where each answered interaction goes (Kafka in service; never blocks the answer)."""

    def publish(self, key: str, event: events_pb2.Interaction) -> None: ...


@dataclass
class ValidRequest:
    """A request that passed the cheap checks; `page_text` is set once the page is read."""

    page_raw: str
    page_is_html: bool
    title: str
    url: str
    question: str
    session_id: str
    params: SamplingParams
    # The asking client's address block: the one a caller with a token named (normalised), else the
    # caller's own (set after the checks, by the servicer).
    client_network: str = ""
    # Set by read_page, after admission and off the event loop.
    page_text: str = ""


def validate(request: inference_pb2.AnswerRequest, limits: LimitSettings) -> ValidRequest:
    """Checks a request against the limits, cheaply (no parsing); InvalidArgument says what is wrong."""
    if len(request.question) > limits.max_question_chars:
        raise InvalidArgument(f"question is longer than {limits.max_question_chars} characters")
    # Control, escape and bidi characters never reach the prompt, logs, Kafka or training data.
    question = clean_text(request.question).strip()
    if not question:
        raise InvalidArgument("question is empty")
    page = request.page
    if len(page.url) > limits.max_url_chars:
        raise InvalidArgument(f"page.url is longer than {limits.max_url_chars} characters")
    if has_unsafe(page.url) or any(c.isspace() for c in page.url):
        raise InvalidArgument("page.url must not contain spaces or control characters")
    if len(page.title) > limits.max_title_chars:
        raise InvalidArgument(f"page.title is longer than {limits.max_title_chars} characters")
    if len(request.session_id) > limits.max_session_id_chars:
        raise InvalidArgument(f"session_id is longer than {limits.max_session_id_chars} characters")
    if has_unsafe(request.session_id):
        raise InvalidArgument("session_id must not contain control characters")
    kind = page.WhichOneof("content")
    raw = page.html if kind == "html" else page.text
    if kind is None or not raw.strip():
        raise InvalidArgument("page has no content: set page.html or page.text")
    if len(raw.encode()) > limits.max_page_bytes:
        raise InvalidArgument(f"page is larger than {limits.max_page_bytes} bytes")
    options = request.options
    if options.max_new_tokens > limits.max_new_tokens:
        raise InvalidArgument(f"options.max_new_tokens must be at most {limits.max_new_tokens}")
    if not 0.0 <= options.temperature <= limits.max_temperature or options.temperature != options.temperature:
        raise InvalidArgument(f"options.temperature must be within [0, {limits.max_temperature}]")
    if not 0.0 <= options.top_p <= 1.0 or options.top_p != options.top_p:
        raise InvalidArgument("options.top_p must be within [0, 1]")
    params = SamplingParams(
        max_new_tokens=options.max_new_tokens or limits.default_max_new_tokens,
        temperature=options.temperature,
        top_p=options.top_p or 1.0,
        seed=options.seed or None,
    )
    title = clean_text(page.title).strip()
    network = _network(request.client_network)
    return ValidRequest(raw, kind == "html", title, page.url, question, request.session_id, params, network)


def _network(value: str) -> str:
    """The normalised address block a client_network names ("" for none); InvalidArgument otherwise."""
    if not value:
        return ""
    try:
        if len(value) > 64 or "/" not in value:
            raise ValueError(value)
        # Host bits set are cleared: the block is what counts.
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise InvalidArgument(
            "client_network must be an address block in CIDR notation, e.g. 203.0.113.0/24"
        ) from None


def read_page(req: ValidRequest, limits: LimitSettings) -> ValidRequest:
    """Reduces the page to clean text (and takes the HTML's title when none was sent): CPU work."""
    if req.page_is_html:
        text, html_title = html_to_text(req.page_raw)
        req.title = req.title or html_title[: limits.max_title_chars]
    else:
        text = normalise_text(req.page_raw)
    if not text:
        raise InvalidArgument("page has no text once reduced to clean text")
    req.page_text, req.page_raw = text, ""
    return req


@dataclass(frozen=True)
class _Header:
    """What is known before the first token: the signed query id, the version, the passages used."""

    query_id: str
    version: str
    passages: list[Passage]


@dataclass(frozen=True)
class _Delta:
    """Text decoded since the last part."""

    text: str


@dataclass(frozen=True)
class _Footer:
    """The finished answer with its timing and token counts."""

    answer: str
    timing: inference_pb2.Timing
    tokens: inference_pb2.TokenCounts
    reason: str


_Part = _Header | _Delta | _Footer


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Answers questions about pages with the model version the router picks for the session."""

    def __init__(
        self,
        router: ModelRouter,
        limits: LimitSettings,
        signer: QueryIdSigner,
        pseudonym_key: bytes,
        sink: InteractionSink | None,
        *,
        authenticator: Authenticator | None = None,
        evidence: EvidenceSettings | None = None,
    ) -> None:
        self._router = router
        self._limits = limits
        self._signer = signer
        self._pseudonym_key = pseudonym_key
        self._sink = sink
        # Callers whose token lets them name their visitor's network (the gateway); none by default.
        self._auth = authenticator or Authenticator({})
        self._evidence = evidence or EvidenceSettings()
        # Requests admitted and not finished, counted from before retrieval so a burst cannot
        # slip past the limit while its prompts are being prepared.
        self._in_flight = 0

    async def _generate(
        self, request: inference_pb2.AnswerRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[_Part, None]:
        """Yields a header, then text deltas, then a footer; the shared core of both RPCs."""
        received = time.perf_counter()
        req = validate(request, self._limits)
        req.client_network = self._asker_network(req, context)
        # Admitted before any CPU work, so a burst of large pages is refused, not parsed.
        if self._in_flight >= self._limits.max_in_flight:
            raise ResourceExhausted("the server is at its request limit; retry later")
        self._in_flight += 1
        QUEUE_DEPTH.set(self._in_flight)
        try:
            # HTML parsing takes ~80 ms for 2 MB: off the event loop, which serves every other call.
            req = await asyncio.to_thread(read_page, req, self._limits)
            # Closed here, not when garbage-collected: a stream closed early cancels its sequence
            # before its in-flight slot is freed, and frees it at once.
            async with contextlib.aclosing(self._run(req, context, received)) as parts:
                async for item in parts:
                    yield item
        finally:
            self._in_flight -= 1
            QUEUE_DEPTH.set(self._in_flight)

    def _asker_network(self, req: ValidRequest, context: grpc.aio.ServicerContext) -> str:
        """The network live evidence counts the asker in: the one a caller with a token (the
        gateway) names for its visitor ("" for none), else the caller's own address block (none on
        loopback). A caller without a token cannot name one, or it could name a new one each time."""
        metadata = request_metadata(context)
        if "authorization" in metadata:
            self._auth.authenticate(metadata)
            return req.client_network
        if req.client_network:
            raise Unauthenticated(
                "client_network is taken only from a caller with a token "
                "(metadata `authorization: Bearer <token>`)"
            )
        return client_network(peer_host(context.peer()), self._evidence)

    async def _run(
        self, req: ValidRequest, context: grpc.aio.ServicerContext, received: float
    ) -> AsyncGenerator[_Part, None]:
        remaining = context.time_remaining()
        deadline = time.monotonic() + (remaining if remaining is not None else self._limits.default_timeout_s)
        # An anonymous caller's deadline shorter than the service's own answer limit is the caller's
        # to miss: its expiry is logged "client_deadline", which live evidence does not count as a
        # failed answer, or any caller could fail its own answers to sink a canary. A caller with a
        # token (the gateway) sets the limit its visitors see, so its expiry stays "deadline".
        callers_own = (
            remaining is not None
            and remaining < self._limits.default_timeout_s
            and "authorization" not in request_metadata(context)
        )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def put(item: tuple[str, Any]) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        for attempt in range(2):
            loaded = self._router.route(req.session_id)
            engine = loaded.engine
            try:
                prepared = await asyncio.to_thread(
                    engine.prepare, req.page_text, req.title, req.question, req.params.max_new_tokens
                )
            except (PromptTooLong, PageNotIndexable) as exc:
                raise InvalidArgument(str(exc)) from exc
            seq = engine.sequence(
                prepared,
                req.question,
                req.params,
                on_token=lambda token: put(("token", token)),
                on_finish=lambda reason, error: put(("finish", (reason, error))),
                deadline=deadline,
            )
            try:
                engine.generator.submit(seq)
                break
            except QueueFull as exc:
                raise ResourceExhausted("the model's queue is full; retry later") from exc
            except RuntimeError as exc:
                # The version was swapped out between routing and submitting: route again.
                if attempt:
                    raise Unavailable("the model version is being replaced; retry") from exc
        # The id carries the asker's pseudonyms: feedback on it counts as this session's alone, and
        # live evidence counts the session's network (when the gateway named it) once.
        session = pseudonymise(self._pseudonym_key, req.session_id, domain="session")
        network = pseudonymise(self._pseudonym_key, req.client_network, domain="network")
        query_id = self._signer.issue(loaded.version, session, network)
        detok = IncrementalDetokenizer(engine.encoder)
        first_token_at: float | None = None
        count = 0
        # Begun before the header: a stream closed while it waits at the header cancels the sequence
        # too, which otherwise generated on to max_new_tokens (~25 s holding a batch slot).
        try:
            yield _Header(query_id, loaded.version, prepared.passages)
            while True:
                kind, value = await events.get()
                if kind == "token":
                    count += 1
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                    delta = detok.push(value)
                    if delta:
                        yield _Delta(delta)
                    continue
                reason, error = value
                break
        finally:
            seq.cancelled.set()  # stops generation when the client went away
        if reason == "cancelled":
            raise asyncio.CancelledError
        finished = time.perf_counter()
        ttft_s = (first_token_at or finished) - received
        answer = detok.text().strip()
        timing = inference_pb2.Timing(
            time_to_first_token_ms=ttft_s * 1000,
            total_ms=(finished - received) * 1000,
            retrieval_ms=prepared.retrieval_ms,
            queue_ms=((seq.admitted_at or seq.submitted_at) - seq.submitted_at) * 1000,
        )
        tokens = inference_pb2.TokenCounts(prompt_tokens=len(prepared.token_ids), completion_tokens=count)
        logged = "client_deadline" if reason == "deadline" and callers_own else reason
        ANSWERS.labels(loaded.version, logged).inc()
        # Failed answers are interactions too: the evaluator's live error rate counts them.
        self._log_interaction(
            query_id, session, loaded.version, req, prepared.passages, answer, timing, tokens, logged
        )
        if error is not None:
            raise error
        if reason == "deadline":
            raise DeadlineExceeded("the deadline passed before the answer was complete")
        TTFT.labels(loaded.version).observe(ttft_s)
        DURATION.labels(loaded.version).observe(finished - received)
        TOKENS.labels(loaded.version).inc(count)
        yield _Footer(answer, timing, tokens, reason)

    def _log_interaction(
        self,
        query_id: str,
        session: str,
        version: str,
        req: ValidRequest,
        passages: list[Passage],
        answer: str,
        timing: inference_pb2.Timing,
        tokens: inference_pb2.TokenCounts,
        reason: str,
    ) -> None:
        if self._sink is None:
            return
        event = events_pb2.Interaction(
            query_id=query_id,
            session_pseudonym=session,
            page_url=req.url,
            page_content_hash=hashlib.sha256(req.page_text.encode()).hexdigest(),
            page_title=req.title,
            question=req.question,
            answer=answer,
            passages=[p.text for p in passages],
            model_version=version,
            time_to_first_token_ms=timing.time_to_first_token_ms,
            total_ms=timing.total_ms,
            prompt_tokens=tokens.prompt_tokens,
            completion_tokens=tokens.completion_tokens,
            finish_reason=reason,
        )
        event.created_at.GetCurrentTime()
        self._sink.publish(query_id, event)

    @staticmethod
    def _passages(passages: list[Passage]) -> list[inference_pb2.Passage]:
        return [inference_pb2.Passage(index=p.index, text=p.text, score=p.score) for p in passages]

    async def Answer(
        self, request: inference_pb2.AnswerRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.AnswerResponse:
        response = inference_pb2.AnswerResponse()
        async with contextlib.aclosing(self._generate(request, context)) as parts:
            async for part in parts:
                if isinstance(part, _Header):
                    response.query_id, response.model_version = part.query_id, part.version
                    response.passages.extend(self._passages(part.passages))
                elif isinstance(part, _Footer):
                    response.answer = part.answer
                    response.timing.CopyFrom(part.timing)
                    response.tokens.CopyFrom(part.tokens)
                    response.finish_reason = part.reason
        return response

    async def StreamAnswer(
        self, request: inference_pb2.AnswerRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.AnswerChunk]:
        # A client that goes away closes this generator (aclose); its parts are closed with it.
        async with contextlib.aclosing(self._generate(request, context)) as parts:
            async for part in parts:
                if isinstance(part, _Header):
                    yield inference_pb2.AnswerChunk(
                        query_id=part.query_id,
                        model_version=part.version,
                        passages=self._passages(part.passages),
                    )
                elif isinstance(part, _Delta):
                    yield inference_pb2.AnswerChunk(delta=part.text)
                else:
                    yield inference_pb2.AnswerChunk(
                        timing=part.timing, tokens=part.tokens, finish_reason=part.reason
                    )
