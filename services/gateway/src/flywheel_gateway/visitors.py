"""The widget's calls: ask (an answer streamed as Server-Sent Events) and feedback, in visitor sessions."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from flywheel_common.networks import client_network
from flywheel_gateway import metrics
from flywheel_gateway.clients import ServiceClients
from flywheel_gateway.ratelimit import RateLimiter
from flywheel_gateway.sessions import VisitorSessions
from flywheel_gateway.settings import GatewaySettings
from flywheel_gateway.web import (
    Guard,
    HttpError,
    error_response,
    from_rpc,
    message_dict,
    text_field,
    unicode_text,
)
from flywheel_proto.flywheel.feedback.v1 import feedback_pb2
from flywheel_proto.flywheel.inference.v1 import inference_pb2


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass(frozen=True)
class _Caller:
    """Who a site request comes from: a visitor session, and whether its cookie must be set."""

    session_id: str
    new_cookie: str | None


class VisitorApi:
    """`/api/v1/answers` and `/api/v1/feedback` for the configured sites' pages.

    Questions go to inference, and visitors' feedback to the feedback service, with the gateway's own
    user-role token, which no browser ever sees.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        clients: ServiceClients,
        guard: Guard,
        *,
        session_key: bytes,
        visitor_token: str,
    ) -> None:
        self.settings = settings
        self.clients = clients
        self.guard = guard
        self.sessions = VisitorSessions(session_key)
        self._metadata = (("authorization", f"Bearer {visitor_token}"),)
        limits = settings.rate_limit
        self._asks = RateLimiter(limits.session_asks, max_keys=limits.max_keys)
        self._feedback = RateLimiter(limits.session_feedback, max_keys=limits.max_keys)

    def routes(self) -> list[Route]:
        handle = self.guard.handle
        return [
            Route("/api/v1/answers", handle(self.answer, cors=True), methods=["POST"]),
            Route("/api/v1/feedback", handle(self.feedback, cors=True), methods=["POST"]),
            Route("/api/v1/answers", self.preflight, methods=["OPTIONS"]),
            Route("/api/v1/feedback", self.preflight, methods=["OPTIONS"]),
        ]

    async def preflight(self, request: Request) -> Response:
        """CORS preflight for the widget's calls from the configured sites."""
        try:
            self.guard.check_origin(request, sites=True)
        except HttpError as error:
            return error_response(error)
        headers = {
            **self.guard.cors(request),
            "access-control-allow-methods": "POST",
            "access-control-allow-headers": "content-type",
            "access-control-max-age": "600",
        }
        return Response(status_code=204, headers=headers)

    def _visitor(self, request: Request) -> _Caller:
        session_id = self.sessions.verify(request.cookies.get(self.settings.session.cookie_name))
        if session_id is not None:
            return _Caller(session_id, None)
        session_id, cookie = self.sessions.new()
        return _Caller(session_id, cookie)

    def _set_cookie(self, response: Response, caller: _Caller) -> None:
        if caller.new_cookie is None:
            return
        s = self.settings.session
        response.set_cookie(
            s.cookie_name,
            caller.new_cookie,
            max_age=s.max_age_s,
            path="/api/v1/",
            secure=s.secure_cookies,
            httponly=True,
            samesite=s.same_site,
        )

    async def answer(self, request: Request) -> Response:
        """Streams an answer as Server-Sent Events: `meta` (query id, version, passages, ticket),
        `delta` (text), then `done` (finish reason, timing) or `error`."""
        started = time.monotonic()
        self.guard.check_origin(request, sites=True)
        caller = self._visitor(request)
        self.guard.limit(self._asks, caller.session_id)
        body = await self.guard.json(request)
        limits = self.settings.limits
        question = text_field(body, "question", limits.max_question_chars)
        page = body.get("page")
        if not isinstance(page, dict):
            raise HttpError(400, "page is required: {url, title, text or html}", reason="invalid")
        content = {k: page[k] for k in ("text", "html") if isinstance(page.get(k), str) and page[k].strip()}
        if len(content) != 1:
            raise HttpError(400, "page needs exactly one of text or html", reason="invalid")
        ((kind, value),) = content.items()
        if len(value) > limits.max_page_chars:
            raise HttpError(
                413, f"the page is longer than {limits.max_page_chars} characters", reason="invalid"
            )
        unicode_text(f"page.{kind}", value)
        rpc_request = inference_pb2.AnswerRequest(
            page=inference_pb2.Page(
                url=text_field(page, "url", 2048, required=False),
                title=text_field(page, "title", 1000, required=False),
                **{kind: value},
            ),
            question=question,
            session_id=caller.session_id,
            client_network=client_network(
                request.client.host if request.client else "", self.settings.evidence
            ),
        )
        # With the gateway's token: inference takes the visitor's network only from a caller it knows.
        call = self.clients.inference.StreamAnswer(
            rpc_request, metadata=self._metadata, timeout=self.settings.services.answer_timeout_s
        )
        # The first chunk (query id, passages) arrives before the response starts, so a refused
        # question is an HTTP error, not an error event in a 200 stream.
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as error:
            raise from_rpc(error) from None
        if first is grpc.aio.EOF:
            raise HttpError(502, "the service ended the answer early")
        response = StreamingResponse(
            self._stream(call, first, caller.session_id, started),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no", **self.guard.cors(request)},
        )
        self._set_cookie(response, caller)
        return response

    async def _stream(
        self, call: Any, first: inference_pb2.AnswerChunk, session_id: str, started: float
    ) -> AsyncIterator[bytes]:
        yield _sse(
            "meta",
            {
                "query_id": first.query_id,
                "model_version": first.model_version,
                "passages": [{"index": p.index, "text": p.text, "score": p.score} for p in first.passages],
                "ticket": self.sessions.ticket(session_id, first.query_id),
            },
        )
        chunk = first
        timed = False
        try:
            while True:
                if chunk.delta:
                    if not timed:
                        metrics.FIRST_TOKEN.observe(time.monotonic() - started)
                        timed = True
                    yield _sse("delta", {"text": chunk.delta})
                if chunk.finish_reason:
                    yield _sse(
                        "done", {"finish_reason": chunk.finish_reason, "timing": message_dict(chunk.timing)}
                    )
                    return
                next_chunk = await call.read()
                if next_chunk is grpc.aio.EOF:
                    yield _sse("done", {"finish_reason": "", "timing": {}})
                    return
                chunk = next_chunk
        except grpc.aio.AioRpcError as error:
            failed = from_rpc(error)
            yield _sse("error", {"error": failed.message, "status": failed.status})
        finally:
            call.cancel()

    async def feedback(self, request: Request) -> Response:
        """A visitor's rating, thumbs, comment or "ignored" on an answer of their own session."""
        self.guard.check_origin(request, sites=True)
        session_id = self.sessions.verify(request.cookies.get(self.settings.session.cookie_name))
        if session_id is None:
            raise HttpError(401, "no session: ask a question first", reason="auth")
        self.guard.limit(self._feedback, session_id)
        body = await self.guard.json(request)
        query_id = text_field(body, "query_id", 512)
        if not self.sessions.check_ticket(session_id, query_id, text_field(body, "ticket", 64)):
            raise HttpError(403, "this answer was not given in this session", reason="auth")
        signal: dict[str, Any] = {}
        if "rating" in body:
            rating = body["rating"]
            if not isinstance(rating, int) or isinstance(rating, bool) or not 1 <= rating <= 5:
                raise HttpError(400, "rating must be an integer from 1 to 5", reason="invalid")
            signal["rating"] = rating
        if "thumbs_up" in body:
            if not isinstance(body["thumbs_up"], bool):
                raise HttpError(400, "thumbs_up must be true or false", reason="invalid")
            signal["thumbs_up"] = body["thumbs_up"]
        if "comment" in body:
            signal["comment"] = text_field(body, "comment", self.settings.limits.max_comment_chars)
        if body.get("ignored") is True:
            signal["ignored"] = True
        if len(signal) != 1:
            raise HttpError(400, "send exactly one of rating, thumbs_up, comment, ignored", reason="invalid")
        key = text_field(body, "idempotency_key", 128, required=False) or uuid.uuid4().hex
        try:
            reply = await self.clients.feedback.SubmitFeedback(
                feedback_pb2.SubmitFeedbackRequest(
                    query_id=query_id, idempotency_key=key, session_id=session_id, **signal
                ),
                metadata=self._metadata,
                timeout=self.settings.services.call_timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc(error) from None
        return JSONResponse(
            {"accepted": True, "duplicate": reply.duplicate}, headers=self.guard.cors(request)
        )
