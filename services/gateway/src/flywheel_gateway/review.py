"""The review console: expert login, the review queue, the expert's actions, the rollout panel.

An expert logs in with their own reviewer token, which the gateway checks against the queue itself
and then keeps in memory; the browser holds only an opaque HttpOnly, SameSite=Strict cookie. Every
action goes to the services with that expert's token, so it carries the expert's role, and only
while the expert holds the item's claim.
"""

from __future__ import annotations

import hashlib
import uuid
from importlib import resources

import grpc
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from flywheel_gateway.clients import ServiceClients
from flywheel_gateway.ratelimit import RateLimiter
from flywheel_gateway.sessions import ExpertSession, ExpertSessions
from flywheel_gateway.settings import GatewaySettings
from flywheel_gateway.web import Guard, HttpError, from_rpc, message_dict, text_field
from flywheel_proto.flywheel.evaluator.v1 import evaluator_pb2
from flywheel_proto.flywheel.feedback.v1 import feedback_pb2
from flywheel_proto.flywheel.trainer.v1 import trainer_pb2


class ReviewApi:
    """`/console` and `/api/v1/review/*`, for the gateway's own origin and logged-in experts only."""

    def __init__(self, settings: GatewaySettings, clients: ServiceClients, guard: Guard) -> None:
        self.settings = settings
        self.clients = clients
        self.guard = guard
        s = settings.session
        self.experts = ExpertSessions(s.console_ttl_s, s.max_console_sessions)
        limits = settings.rate_limit
        self._console = RateLimiter(limits.console, max_keys=limits.max_keys)

    def routes(self) -> list[Route]:
        handle = self.guard.handle
        return [
            Route("/console", self.console_page, methods=["GET"]),
            Route("/console/login", handle(self.login), methods=["POST"]),
            Route("/console/logout", handle(self.logout), methods=["POST"]),
            Route("/api/v1/review/items", handle(self.review_items), methods=["GET"]),
            Route("/api/v1/review/claim", handle(self.review_claim), methods=["POST"]),
            Route("/api/v1/review/actions", handle(self.review_action), methods=["POST"]),
            Route("/api/v1/review/status", handle(self.review_status), methods=["GET"]),
        ]

    def _expert(self, request: Request) -> ExpertSession:
        cookie = request.cookies.get(self.settings.session.console_cookie_name)
        session = self.experts.get(cookie)
        if cookie is None or session is None:
            raise HttpError(401, "log in to the review console first", reason="auth")
        self.guard.limit(self._console, cookie)
        return session

    async def console_page(self, request: Request) -> Response:
        page = resources.files("flywheel_gateway").joinpath("static", "console.html").read_bytes()
        return HTMLResponse(page, headers={"cache-control": "no-store"})

    async def login(self, request: Request) -> Response:
        """Checks an expert's token against the review queue itself (expert or admin role), then
        keeps it here and gives the browser an opaque, HttpOnly, SameSite=Strict cookie."""
        self.guard.check_origin(request, sites=False)
        token = text_field(await self.guard.json(request), "token", 512)
        if not all("!" <= c <= "~" for c in token):
            raise HttpError(400, "a token is printable ASCII without spaces", reason="invalid")
        try:
            await self.clients.trainer.ListReviewItems(
                trainer_pb2.ListReviewItemsRequest(limit=1),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=self.settings.services.call_timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                raise HttpError(403, "this token has no expert role", reason="auth") from None
            raise from_rpc(error) from None
        s = self.settings.session
        # A login replaces the browser's earlier one: its cookie must not stay valid on the server.
        self.experts.drop(request.cookies.get(s.console_cookie_name))
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
        self.guard.check_origin(request, sites=False)
        self.experts.drop(request.cookies.get(self.settings.session.console_cookie_name))
        response = Response(status_code=204)
        response.delete_cookie(self.settings.session.console_cookie_name, path="/")
        return response

    def _expert_metadata(self, session: ExpertSession) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {session.token}"),)

    async def review_items(self, request: Request) -> Response:
        """The queue: `order` newest (default) or impact, `limit` items."""
        self.guard.check_origin(request, sites=False)
        session = self._expert(request)
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
                    limit=min(max(0, limit), 2**31 - 1),
                    order=trainer_pb2.REVIEW_ORDER_IMPACT
                    if order == "impact"
                    else trainer_pb2.REVIEW_ORDER_NEWEST,
                ),
                metadata=self._expert_metadata(session),
                timeout=self.settings.services.call_timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc(error) from None
        return JSONResponse(
            {"items": [message_dict(i) for i in reply.items], "canary_version": reply.canary_version},
            headers={"cache-control": "no-store"},
        )

    async def review_claim(self, request: Request) -> Response:
        """Claims an item for this expert (or releases it with `release: true`)."""
        self.guard.check_origin(request, sites=False)
        session = self._expert(request)
        body = await self.guard.json(request)
        try:
            item = await self.clients.trainer.ClaimReviewItem(
                trainer_pb2.ClaimReviewItemRequest(
                    query_id=text_field(body, "query_id", 512), release=body.get("release") is True
                ),
                metadata=self._expert_metadata(session),
                timeout=self.settings.services.call_timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc(error) from None
        return JSONResponse(message_dict(item))

    async def review_action(self, request: Request) -> Response:
        """accept (a top rating from the expert; a note goes with it as the expert's comment),
        correct (the expert's answer) or unanswerable (the model's "not on the page" answer as the
        correction); all with the expert's own role, and only while the expert holds the claim.

        `idempotency_key`: one per item and action, the same on every retry of it (the console's),
        so that a retry is stored once; without one each request is a new action."""
        self.guard.check_origin(request, sites=False)
        session = self._expert(request)
        body = await self.guard.json(request)
        limits = self.settings.limits
        query_id = text_field(body, "query_id", 512)
        action = body.get("action")
        if action not in ("accept", "correct", "unanswerable"):
            raise HttpError(400, "action is accept, correct or unanswerable", reason="invalid")
        note = text_field(body, "note", limits.max_note_chars, required=False)
        corrected = (
            text_field(body, "answer", limits.max_correction_chars)
            if action == "correct"
            else self.settings.unanswerable_answer
        )
        key = text_field(body, "idempotency_key", 128, required=False) or uuid.uuid4().hex
        timeout = self.settings.services.call_timeout_s
        metadata = self._expert_metadata(session)
        try:
            claimed_until = await self._claim_to_act(query_id, metadata)
            if action == "accept":
                reply = await self.clients.feedback.SubmitFeedback(
                    feedback_pb2.SubmitFeedbackRequest(query_id=query_id, rating=5, idempotency_key=key),
                    metadata=metadata,
                    timeout=timeout,
                )
                if note:
                    # A rating carries no text: the note is the expert's comment on the answer, with a
                    # key of its own that a retry repeats too.
                    note_key = hashlib.sha256(f"{key}|note".encode()).hexdigest()[:32]
                    await self.clients.feedback.SubmitFeedback(
                        feedback_pb2.SubmitFeedbackRequest(
                            query_id=query_id, comment=note, idempotency_key=note_key
                        ),
                        metadata=metadata,
                        timeout=timeout,
                    )
            else:
                reply = await self.clients.feedback.SubmitCorrection(
                    feedback_pb2.SubmitCorrectionRequest(
                        query_id=query_id, corrected_answer=corrected, note=note, idempotency_key=key
                    ),
                    metadata=metadata,
                    timeout=timeout,
                )
        except grpc.aio.AioRpcError as error:
            raise from_rpc(error) from None
        return JSONResponse(
            {
                "feedback_id": reply.feedback_id,
                "duplicate": reply.duplicate,
                "claimed_until": claimed_until,
            }
        )

    async def _claim_to_act(self, query_id: str, metadata: tuple[tuple[str, str], ...]) -> str:
        """Claims the item before an action: renews the expert's own claim, refuses (409) while another
        expert holds it or once it is reviewed, so two experts never both answer one item.

        An answer the trainer has not stored yet (its interaction still on its way through Kafka) has
        no claim to hold: the action goes through, and the trainer keeps one correction per answer.
        Returns the claim's end ("" for such an answer)."""
        try:
            item = await self.clients.trainer.ClaimReviewItem(
                trainer_pb2.ClaimReviewItemRequest(query_id=query_id),
                metadata=metadata,
                timeout=self.settings.services.call_timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return ""
            raise from_rpc(error) from None
        return str(message_dict(item).get("claimed_until", ""))

    async def review_status(self, request: Request) -> Response:
        """The side panel: the rollout state and the last gate decisions."""
        self.guard.check_origin(request, sites=False)
        session = self._expert(request)
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
            raise from_rpc(error) from None
        rollout_data = message_dict(rollout)
        rollout_data.pop("history", None)
        return JSONResponse(
            {
                "rollout": rollout_data,
                "decisions": [
                    {k: v for k, v in message_dict(d).items() if k != "metrics"} for d in decisions.decisions
                ],
            },
            headers={"cache-control": "no-store"},
        )
