"""The EvaluatorService servicer: reports, decisions and the rollout; admin calls need the admin role."""

from __future__ import annotations

import asyncio
import logging
import re

import grpc

from flywheel_common.auth import Authenticator, Principal, Role
from flywheel_common.errors import InvalidArgument, NotFound
from flywheel_common.grpc_server import request_metadata
from flywheel_common.pseudonym import session_to_forget
from flywheel_common.redaction import Redactor
from flywheel_common.registry import RolloutState, check_version_name
from flywheel_common.text import clean_text
from flywheel_evaluator import metrics
from flywheel_evaluator.evaluation import EvaluationResult
from flywheel_evaluator.gatekeeper import Gatekeeper
from flywheel_proto.flywheel.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc

log = logging.getLogger(__name__)

# ListDecisions answers at most this many decisions; a limit of 0 means this many.
MAX_LIST = 100
# An admin's reason goes into the rollout history and the decision log.
MAX_REASON_CHARS = 1000
# A request id is kept in rollout.json (which every inference replica reads each second) and logged.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _reason(request: evaluator_pb2.VersionRequest) -> str:
    """The request's reason, bounded, cleaned and redacted (an operator's "after a complaint from …"
    is logged, kept in the decision log, sent on Kafka and shown to experts); its version, when
    given, checked first."""
    if request.version:
        check_version_name(request.version)
    if len(request.reason) > MAX_REASON_CHARS:
        raise InvalidArgument(f"reason is longer than {MAX_REASON_CHARS} characters")
    return Redactor(presidio=False).redact(clean_text(request.reason).strip()).text


def _request_id(request: evaluator_pb2.VersionRequest) -> str:
    """The request's idempotency id, checked: empty, or 1-128 letters, digits and `._:-`."""
    if request.request_id and not _REQUEST_ID.fullmatch(request.request_id):
        raise InvalidArgument("request_id must be 1-128 letters, digits, '.', '_', ':' or '-'")
    return request.request_id


def report_message(result: EvaluationResult, summary: str) -> evaluator_pb2.Report:
    """An evaluation as the Report message (metrics with their 95% intervals)."""
    report = evaluator_pb2.Report(
        version=result.version,
        golden_set=result.golden_set,
        questions=len(result.items),
        summary=summary,
    )
    for name, m in result.metrics.items():
        report.metrics[name].CopyFrom(
            evaluator_pb2.MetricValue(value=m["value"], ci_low=m["ci_low"], ci_high=m["ci_high"])
        )
    if result.created_at:
        report.created_at.FromJsonString(result.created_at.replace("+00:00", "Z"))
    return report


def rollout_message(state: RolloutState, history: int = 20) -> evaluator_pb2.Rollout:
    """The registry's rollout state as the Rollout message (the last `history` changes)."""
    return evaluator_pb2.Rollout(
        production=state.production or "",
        canary=state.canary or "",
        canary_fraction=state.canary_fraction,
        pinned=state.pinned,
        auto_rollout=state.auto_rollout,
        history=[f"{h.get('at', '')} {h.get('note', '')}" for h in state.history[-history:]],
    )


class EvaluatorServicer(evaluator_pb2_grpc.EvaluatorServiceServicer):
    """Reads are open to any caller on the network; evaluation and rollout moves need the admin role."""

    def __init__(self, gatekeeper: Gatekeeper, authenticator: Authenticator, pseudonym_key: bytes) -> None:
        self._gatekeeper = gatekeeper
        self._auth = authenticator
        self._pseudonym_key = pseudonym_key

    def _admin(self, context: grpc.aio.ServicerContext) -> str:
        principal: Principal = self._auth.authenticate(request_metadata(context))
        principal.require(Role.ADMIN)
        return f"admin:{principal.token_hash[:8]}"

    async def Evaluate(
        self, request: evaluator_pb2.EvaluateRequest, context: grpc.aio.ServicerContext
    ) -> evaluator_pb2.Report:
        actor = self._admin(context)
        if not request.version:
            raise InvalidArgument("version is required")
        result = await asyncio.to_thread(self._gatekeeper.evaluate_now, request.version, actor)
        return report_message(result, await asyncio.to_thread(self._gatekeeper.summary, request.version))

    async def GetReport(
        self, request: evaluator_pb2.GetReportRequest, context: grpc.aio.ServicerContext
    ) -> evaluator_pb2.Report:
        if not request.version:
            raise InvalidArgument("version is required")
        result, summary = await asyncio.to_thread(self._gatekeeper.report, request.version)
        if result is None:
            raise NotFound(f"{request.version} has not been evaluated")
        return report_message(result, summary)

    async def ListDecisions(
        self, request: evaluator_pb2.ListDecisionsRequest, context: grpc.aio.ServicerContext
    ) -> evaluator_pb2.ListDecisionsResponse:
        newest = await asyncio.to_thread(
            self._gatekeeper.decisions_newest_first, min(request.limit or MAX_LIST, MAX_LIST)
        )
        return evaluator_pb2.ListDecisionsResponse(decisions=[d.to_proto() for d in newest])

    async def GetRollout(
        self, request: evaluator_pb2.GetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> evaluator_pb2.Rollout:
        return rollout_message(await asyncio.to_thread(self._gatekeeper.state))

    async def Promote(
        self, request: evaluator_pb2.VersionRequest, context: grpc.aio.ServicerContext
    ) -> evaluator_pb2.Rollout:
        actor = self._admin(context)
        move = self._gatekeeper.promote
        state = await asyncio.to_thread(
            move, request.version, reason=_reason(request), actor=actor, request_id=_request_id(request)
        )
        return rollout_message(state)

    async def Rollback(
        self, request: evaluator_pb2.VersionRequest, context: grpc.aio.ServicerContext
    ) -> evaluator_pb2.Rollout:
        actor = self._admin(context)
        move = self._gatekeeper.rollback
        state = await asyncio.to_thread(
            move, request.version, reason=_reason(request), actor=actor, request_id=_request_id(request)
        )
        return rollout_message(state)

    async def Pin(
        self, request: evaluator_pb2.VersionRequest, context: grpc.aio.ServicerContext
    ) -> evaluator_pb2.Rollout:
        actor = self._admin(context)
        move = self._gatekeeper.pin
        return rollout_message(
            await asyncio.to_thread(move, request.version, reason=_reason(request), actor=actor)
        )

    async def SetAutoRollout(
        self, request: evaluator_pb2.SetAutoRolloutRequest, context: grpc.aio.ServicerContext
    ) -> evaluator_pb2.Rollout:
        actor = self._admin(context)
        move = self._gatekeeper.set_auto_rollout
        return rollout_message(await asyncio.to_thread(move, request.enabled, actor=actor))

    async def ForgetSession(
        self, request: evaluator_pb2.ForgetSessionRequest, context: grpc.aio.ServicerContext
    ) -> evaluator_pb2.ForgetSessionResponse:
        """Forgets one visitor's session in the live signals (admin only; docs/security.md)."""
        actor = self._admin(context)
        session = session_to_forget(self._pseudonym_key, request.session_id, request.session_pseudonym)
        votes, served = await asyncio.to_thread(self._gatekeeper.store.forget, session)
        metrics.FORGOTTEN.inc()
        log.info("%s forgot a session in the live signals: %d votes, %d served rows", actor, votes, served)
        return evaluator_pb2.ForgetSessionResponse(votes=votes, served=served)
