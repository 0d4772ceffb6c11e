"""The HTTP API: the widget's ask / stream / feedback calls, expert login and the review queue.

Browsers never see a bearer token: visitors' feedback goes out with the gateway's own user token,
experts' actions with the token they logged in with, which stays in the gateway's memory.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from html import escape
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from flywheel_gateway import metrics
from flywheel_gateway.clients import ServiceClients
from flywheel_gateway.ratelimit import RateLimiter
from flywheel_gateway.sessions import ExpertSession, ExpertSessions, VisitorSessions
from flywheel_gateway.settings import GatewaySettings
from flywheel_proto.flywheel.evaluator.v1 import evaluator_pb2
from flywheel_proto.flywheel.feedback.v1 import feedback_pb2
from flywheel_proto.flywheel.inference.v1 import inference_pb2
from flywheel_proto.flywheel.trainer.v1 import trainer_pb2

log = logging.getLogger(__name__)

# Nothing but the gateway's own files, and fetches to itself: the console and demo pages run no
# inline script or style, and no page may frame them.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
_STATIC = {
    "widget.js": "text/javascript; charset=utf-8",
    "widget.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
# Status of a service's gRPC error as the browser gets it; anything else is a 502 with no details.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_ROUTES = {
    "/widget.js",
    "/widget.css",
    "/console",
    "/console.js",
    "/console.css",
    "/console/login",
    "/console/logout",
    "/api/v1/answers",
    "/api/v1/feedback",
    "/api/v1/review/items",
    "/api/v1/review/claim",
    "/api/v1/review/actions",
    "/api/v1/review/status",
    "/healthz",
    "/readyz",
}


class HttpError(Exception):
    """An error the browser gets as `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str, *, reason: str = "", retry_after_s: float = 0) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.retry_after_s = retry_after_s


def _error_response(error: HttpError, headers: dict[str, str] | None = None) -> JSONResponse:
    if error.reason:
        metrics.REFUSED.labels(error.reason).inc()
    extra = dict(headers or {})
    if error.retry_after_s:
        extra["retry-after"] = str(max(1, round(error.retry_after_s)))
    return JSONResponse({"error": error.message}, status_code=error.status, headers=extra)


def _from_rpc(error: grpc.aio.AioRpcError) -> HttpError:
    status = _HTTP_STATUS.get(error.code(), 502)
    if status >= 500:
        log.warning("service call failed: %s", error.code().name)
        return HttpError(status, "the service is unavailable; try again shortly")
    return HttpError(status, error.details() or error.code().name.lower())


def _text(body: dict[str, Any], name: str, max_chars: int, *, required: bool = True) -> str:
    value = body.get(name, "")
    if not isinstance(value, str):
        raise HttpError(400, f"{name} must be a string", reason="invalid")
    value = value.strip()
    if required and not value:
        raise HttpError(400, f"{name} is required", reason="invalid")
    if len(value) > max_chars:
        raise HttpError(400, f"{name} is longer than {max_chars} characters", reason="invalid")
    return value


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _message(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


@dataclass(frozen=True)
class _Caller:
    """Who a site request comes from: a visitor session, and whether its cookie must be set."""

    session_id: str
    new_cookie: str | None


class Gateway:
    """The routes' state: service stubs, sessions, rate limiters; `asgi()` builds the application."""

    def __init__(
        self,
        settings: GatewaySettings,
        clients: ServiceClients,
        *,
        session_key: bytes,
        visitor_token: str,
    ) -> None:
        self.settings = settings
        self.clients = clients
        self.visitors = VisitorSessions(session_key)
        s = settings.session
        self.experts = ExpertSessions(s.console_ttl_s, s.max_console_sessions)
        self._visitor_metadata = (("authorization", f"Bearer {visitor_token}"),)
        limits = settings.rate_limit
        self._asks = RateLimiter(limits.session_asks, max_keys=limits.max_keys)
        self._feedback = RateLimiter(limits.session_feedback, max_keys=limits.max_keys)
        self._addresses = RateLimiter(limits.address, max_keys=limits.max_keys)
        self._console = RateLimiter(limits.console, max_keys=limits.max_keys)
        self._sites = set(settings.sites)
        self._static = {
            name: resources.files("flywheel_gateway").joinpath("static", name) for name in _STATIC
        }

    # --- the application -------------------------------------------------------------------------

    def asgi(self) -> ASGIApp:
        """The Starlette application, wrapped in the security-headers and metrics middleware."""
        api = "/api/v1"
        routes = [
            Route("/widget.js", self._asset, methods=["GET"]),
            Route("/widget.css", self._asset, methods=["GET"]),
            Route("/console.js", self._asset, methods=["GET"]),
            Route("/console.css", self._asset, methods=["GET"]),
            Route("/console", self.console_page, methods=["GET"]),
            Route("/console/login", self._handle(self.login), methods=["POST"]),
            Route("/console/logout", self._handle(self.logout), methods=["POST"]),
            Route(f"{api}/answers", self._handle(self.answer), methods=["POST"]),
            Route(f"{api}/feedback", self._handle(self.feedback), methods=["POST"]),
            Route(f"{api}/answers", self.preflight, methods=["OPTIONS"]),
            Route(f"{api}/feedback", self.preflight, methods=["OPTIONS"]),
            Route(f"{api}/review/items", self._handle(self.review_items), methods=["GET"]),
            Route(f"{api}/review/claim", self._handle(self.review_claim), methods=["POST"]),
            Route(f"{api}/review/actions", self._handle(self.review_action), methods=["POST"]),
            Route(f"{api}/review/status", self._handle(self.review_status), methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
        ]
        if self.settings.demo_pages_dir is not None:
            routes += [
                Route("/demo/", self.demo_index, methods=["GET"]),
                Route("/demo/{name}", self.demo_page, methods=["GET"]),
            ]
        return _Headers(Starlette(routes=routes))

    def _handle(
        self, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """Runs a handler, turning HttpError into its JSON response (with CORS headers for sites)."""

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except HttpError as error:
                return _error_response(error, self._cors(request))

        return run

    # --- origins, sessions, limits ---------------------------------------------------------------

    def _own_origin(self, request: Request) -> str:
        return f"{request.url.scheme}://{request.url.netloc}".lower()

    def _check_origin(self, request: Request, *, sites: bool) -> None:
        """Refuses a request whose Origin is neither the gateway's own nor (for site calls) a site's.

        Browsers send Origin with every cross-origin request and every POST: a state-changing call
        without one is not from a page and is refused too.
        """
        origin = (request.headers.get("origin") or "").lower()
        if not origin:
            if request.method == "GET":
                return
            raise HttpError(403, "an Origin header is required", reason="origin")
        if origin == self._own_origin(request) or (sites and origin in self._sites):
            return
        raise HttpError(403, "this origin is not allowed", reason="origin")

    def _cors(self, request: Request) -> dict[str, str]:
        origin = (request.headers.get("origin") or "").lower()
        if origin not in self._sites or not request.url.path.startswith(
            ("/api/v1/answers", "/api/v1/feedback")
        ):
            return {}
        return {
            "access-control-allow-origin": origin,
            "access-control-allow-credentials": "true",
            "vary": "Origin",
        }

    async def preflight(self, request: Request) -> Response:
        """CORS preflight for the widget's calls from the configured sites."""
        try:
            self._check_origin(request, sites=True)
        except HttpError as error:
            return _error_response(error)
        headers = {
            **self._cors(request),
            "access-control-allow-methods": "POST",
            "access-control-allow-headers": "content-type",
            "access-control-max-age": "600",
        }
        return Response(status_code=204, headers=headers)

    def _limit(self, limiter: RateLimiter, key: str) -> None:
        wait = limiter.take(key)
        if wait:
            raise HttpError(429, "too many requests; slow down", reason="rate_limit", retry_after_s=wait)

    def _client_address(self, request: Request) -> str:
        return request.client.host if request.client else "unknown"

    def _visitor(self, request: Request) -> _Caller:
        cookie_name = self.settings.session.cookie_name
        session_id = self.visitors.verify(request.cookies.get(cookie_name))
        if session_id is not None:
            return _Caller(session_id, None)
        session_id, cookie = self.visitors.new()
        return _Caller(session_id, cookie)

    def _set_visitor_cookie(self, response: Response, caller: _Caller) -> None:
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

    def _expert(self, request: Request) -> tuple[str, ExpertSession]:
        cookie = request.cookies.get(self.settings.session.console_cookie_name)
        session = self.experts.get(cookie)
        if cookie is None or session is None:
            raise HttpError(401, "log in to the review console first", reason="auth")
        self._limit(self._console, cookie)
        return cookie, session

    async def _json(self, request: Request) -> dict[str, Any]:
        limit = self.settings.limits.max_body_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise HttpError(413, f"the request is larger than {limit} bytes", reason="invalid")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise HttpError(415, "send application/json", reason="invalid")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise HttpError(413, f"the request is larger than {limit} bytes", reason="invalid")
        try:
            data = json.loads(body)
        except ValueError:
            raise HttpError(400, "the body is not valid JSON", reason="invalid") from None
        if not isinstance(data, dict):
            raise HttpError(400, "the body must be a JSON object", reason="invalid")
        return data

    # --- the widget's calls ----------------------------------------------------------------------

    async def answer(self, request: Request) -> Response:
        """Streams an answer as Server-Sent Events: `meta` (query id, version, passages, ticket),
        `delta` (text), then `done` (finish reason, timing) or `error`."""
        started = time.monotonic()
        self._check_origin(request, sites=True)
        self._limit(self._addresses, self._client_address(request))
        caller = self._visitor(request)
        self._limit(self._asks, caller.session_id)
        body = await self._json(request)
        limits = self.settings.limits
        question = _text(body, "question", limits.max_question_chars)
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
        rpc_request = inference_pb2.AnswerRequest(
            page=inference_pb2.Page(
                url=_text(page, "url", 2048, required=False),
                title=_text(page, "title", 1000, required=False),
                **{kind: value},
            ),
            question=question,
            session_id=caller.session_id,
        )
        call = self.clients.inference.StreamAnswer(
            rpc_request, timeout=self.settings.services.answer_timeout_s
        )
        # The first chunk (query id, passages) arrives before the response starts, so a refused
        # question is an HTTP error, not an error event in a 200 stream.
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as error:
            raise _from_rpc(error) from None
        if first is grpc.aio.EOF:
            raise HttpError(502, "the service ended the answer early")
        response = StreamingResponse(
            self._stream(call, first, caller.session_id, started),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no", **self._cors(request)},
        )
        self._set_visitor_cookie(response, caller)
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
                "ticket": self.visitors.ticket(session_id, first.query_id),
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
                        "done", {"finish_reason": chunk.finish_reason, "timing": _message(chunk.timing)}
                    )
                    return
                next_chunk = await call.read()
                if next_chunk is grpc.aio.EOF:
                    yield _sse("done", {"finish_reason": "", "timing": {}})
                    return
                chunk = next_chunk
        except grpc.aio.AioRpcError as error:
            failed = _from_rpc(error)
            yield _sse("error", {"error": failed.message, "status": failed.status})
        finally:
            call.cancel()

    async def feedback(self, request: Request) -> Response:
        """A visitor's rating, thumbs, comment or "ignored" on an answer of their own session."""
        self._check_origin(request, sites=True)
        self._limit(self._addresses, self._client_address(request))
        session_id = self.visitors.verify(request.cookies.get(self.settings.session.cookie_name))
        if session_id is None:
            raise HttpError(401, "no session: ask a question first", reason="auth")
        self._limit(self._feedback, session_id)
        body = await self._json(request)
        query_id = _text(body, "query_id", 512)
        if not self.visitors.check_ticket(session_id, query_id, _text(body, "ticket", 64)):
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
            signal["comment"] = _text(body, "comment", self.settings.limits.max_comment_chars)
        if body.get("ignored") is True:
            signal["ignored"] = True
        if len(signal) != 1:
            raise HttpError(400, "send exactly one of rating, thumbs_up, comment, ignored", reason="invalid")
        key = _text(body, "idempotency_key", 128, required=False) or uuid.uuid4().hex
        try:
            reply = await self.clients.feedback.SubmitFeedback(
                feedback_pb2.SubmitFeedbackRequest(
                    query_id=query_id, idempotency_key=key, session_id=session_id, **signal
                ),
                metadata=self._visitor_metadata,
                timeout=self.settings.services.call_timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            raise _from_rpc(error) from None
        return JSONResponse({"accepted": True, "duplicate": reply.duplicate}, headers=self._cors(request))

    # --- the review console ----------------------------------------------------------------------

    async def console_page(self, request: Request) -> Response:
        return HTMLResponse(self._read_static("console.html"), headers={"cache-control": "no-store"})

    async def login(self, request: Request) -> Response:
        """Checks an expert's token against the review queue itself (expert or admin role), then
        keeps it here and gives the browser an opaque, HttpOnly, SameSite=Strict cookie."""
        self._check_origin(request, sites=False)
        self._limit(self._addresses, self._client_address(request))
        token = _text(await self._json(request), "token", 512)
        try:
            await self.clients.trainer.ListReviewItems(
                trainer_pb2.ListReviewItemsRequest(limit=1),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=self.settings.services.call_timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                raise HttpError(403, "this token has no expert role", reason="auth") from None
            raise _from_rpc(error) from None
        s = self.settings.session
        response = Response(status_code=204)
        response.set_cookie(
            s.console_cookie_name,
            self.experts.create(token),
            max_age=int(s.console_ttl_s),
            path="/",
            secure=s.secure_cookies,
            httponly=True,
            samesite="strict",
        )
        return response

    async def logout(self, request: Request) -> Response:
        self._check_origin(request, sites=False)
        self.experts.drop(request.cookies.get(self.settings.session.console_cookie_name))
        response = Response(status_code=204)
        response.delete_cookie(self.settings.session.console_cookie_name, path="/")
        return response

    def _expert_metadata(self, session: ExpertSession) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {session.token}"),)

    async def review_items(self, request: Request) -> Response:
        """The queue: `order` newest (default) or impact, `limit` items."""
        self._check_origin(request, sites=False)
        _, session = self._expert(request)
        order = request.query_params.get("order", "newest")
        if order not in ("newest", "impact"):
            raise HttpError(400, "order is newest or impact", reason="invalid")
        try:
            limit = int(request.query_params.get("limit", "50"))
        except ValueError:
            raise HttpError(400, "limit must be a number", reason="invalid") from None
        try:
            reply = await self.clients.trainer.ListReviewItems(
                trainer_pb2.ListReviewItemsRequest(
                    limit=max(0, limit),
                    order=trainer_pb2.REVIEW_ORDER_IMPACT
                    if order == "impact"
                    else trainer_pb2.REVIEW_ORDER_NEWEST,
                ),
                metadata=self._expert_metadata(session),
                timeout=self.settings.services.call_timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            raise _from_rpc(error) from None
        return JSONResponse(
            {"items": [_message(i) for i in reply.items], "canary_version": reply.canary_version},
            headers={"cache-control": "no-store"},
        )

    async def review_claim(self, request: Request) -> Response:
        """Claims an item for this expert (or releases it with `release: true`)."""
        self._check_origin(request, sites=False)
        _, session = self._expert(request)
        body = await self._json(request)
        try:
            item = await self.clients.trainer.ClaimReviewItem(
                trainer_pb2.ClaimReviewItemRequest(
                    query_id=_text(body, "query_id", 512), release=body.get("release") is True
                ),
                metadata=self._expert_metadata(session),
                timeout=self.settings.services.call_timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            raise _from_rpc(error) from None
        return JSONResponse(_message(item))

    async def review_action(self, request: Request) -> Response:
        """accept (a top rating from the expert), correct (the expert's answer) or unanswerable (the
        model's "not on the page" answer as the correction); all with the expert's own role."""
        self._check_origin(request, sites=False)
        _, session = self._expert(request)
        body = await self._json(request)
        limits = self.settings.limits
        query_id = _text(body, "query_id", 512)
        action = body.get("action")
        note = _text(body, "note", limits.max_note_chars, required=False)
        key = _text(body, "idempotency_key", 128, required=False) or uuid.uuid4().hex
        timeout = self.settings.services.call_timeout_s
        metadata = self._expert_metadata(session)
        try:
            if action == "accept":
                reply = await self.clients.feedback.SubmitFeedback(
                    feedback_pb2.SubmitFeedbackRequest(query_id=query_id, rating=5, idempotency_key=key),
                    metadata=metadata,
                    timeout=timeout,
                )
            elif action in ("correct", "unanswerable"):
                corrected = (
                    _text(body, "answer", limits.max_correction_chars)
                    if action == "correct"
                    else self.settings.unanswerable_answer
                )
                reply = await self.clients.feedback.SubmitCorrection(
                    feedback_pb2.SubmitCorrectionRequest(
                        query_id=query_id, corrected_answer=corrected, note=note, idempotency_key=key
                    ),
                    metadata=metadata,
                    timeout=timeout,
                )
            else:
                raise HttpError(400, "action is accept, correct or unanswerable", reason="invalid")
        except grpc.aio.AioRpcError as error:
            raise _from_rpc(error) from None
        return JSONResponse({"feedback_id": reply.feedback_id, "duplicate": reply.duplicate})

    async def review_status(self, request: Request) -> Response:
        """The side panel: the rollout state and the last gate decisions."""
        self._check_origin(request, sites=False)
        _, session = self._expert(request)
        timeout = self.settings.services.call_timeout_s
        metadata = self._expert_metadata(session)
        try:
            rollout = await self.clients.evaluator.GetRollout(
                evaluator_pb2.GetRolloutRequest(), metadata=metadata, timeout=timeout
            )
            decisions = await self.clients.evaluator.ListDecisions(
                evaluator_pb2.ListDecisionsRequest(limit=5), metadata=metadata, timeout=timeout
            )
        except grpc.aio.AioRpcError as error:
            raise _from_rpc(error) from None
        rollout_data = _message(rollout)
        rollout_data.pop("history", None)
        return JSONResponse(
            {
                "rollout": rollout_data,
                "decisions": [
                    {k: v for k, v in _message(d).items() if k != "metrics"} for d in decisions.decisions
                ],
            },
            headers={"cache-control": "no-store"},
        )

    # --- files and probes ------------------------------------------------------------------------

    def _read_static(self, name: str) -> bytes:
        return resources.files("flywheel_gateway").joinpath("static", name).read_bytes()

    async def _asset(self, request: Request) -> Response:
        name = request.url.path.lstrip("/")
        headers = {"cache-control": "public, max-age=300", "cross-origin-resource-policy": "cross-origin"}
        return Response(self._static[name].read_bytes(), media_type=_STATIC[name], headers=headers)

    def _demo_pages(self) -> dict[str, Path]:
        folder = self.settings.demo_pages_dir
        assert folder is not None
        return {p.name: p for p in sorted(folder.glob("*.html"))}

    async def demo_index(self, request: Request) -> Response:
        links = "".join(f'<li><a href="{quote(n)}">{escape(n)}</a></li>' for n in self._demo_pages())
        head = '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Pages</title></head>'
        return HTMLResponse(f"{head}<body><h1>Pages with the widget</h1><ul>{links}</ul></body></html>")

    async def demo_page(self, request: Request) -> Response:
        """A page of the demo folder with the widget's script tag added, as a site owner would."""
        path = self._demo_pages().get(request.path_params["name"])
        if path is None:
            return JSONResponse({"error": "no such page"}, status_code=404)
        html = path.read_text(encoding="utf-8")
        tag = '<script src="/widget.js" defer></script>'
        html = html.replace("</body>", f"{tag}\n</body>") if "</body>" in html else html + tag
        return HTMLResponse(html)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """Ready when the services visitors need (inference, feedback) report SERVING."""
        ready = {name: await self.clients.serving(name) for name in ("inference", "feedback")}
        return JSONResponse(ready, status_code=200 if all(ready.values()) else 503)


class _Headers:
    """Adds the security headers to every response and counts responses by route and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in _ROUTES else "/demo" if path.startswith("/demo/") else "other"

        async def send_with_headers(message: AsgiMessage) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_SECURITY_HEADERS]
                metrics.REQUESTS.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, send_with_headers)
