"""The EvaluatorService servicer: reports, decisions and the rollout; admin calls need the admin role."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc

from flywheel_common.auth import Authenticator, Principal, Role
from flywheel_common.errors import InvalidArgument, NotFound
from flywheel_common.registry import RolloutState, check_version_name
from flywheel_common.text import clean_text
from flywheel_evaluator.evaluation import EVALUATION_MD, EvaluationResult, read_stored
from flywheel_proto.flywheel.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc

if TYPE_CHECKING:
    from flywheel_evaluator.__main__ import EvaluatorApp

GATE_MD = "gate.md"
# ListDecisions answers at most this many decisions; a limit of 0 means this many.
MAX_LIST = 100
# An admin's reason goes into the rollout history and the decision log.
MAX_REASON_CHARS = 1000


def _reason(request: evaluator_pb2.VersionRequest) -> str:
    """The request's reason, bounded and cleaned; its version, when given, checked first."""
    if request.version:
        check_version_name(request.version)
    if len(request.reason) > MAX_REASON_CHARS:
        raise InvalidArgument(f"reason is longer than {MAX_REASON_CHARS} characters")
    return clean_text(request.reason).strip()


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

    def __init__(self, app: EvaluatorApp, authenticator: Authenticator) -> None:
        self._app = app
        self._auth = authenticator

    def _admin(self, context: grpc.aio.ServicerContext) -> str:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        principal: Principal = self._auth.authenticate(metadata)
        principal.require(Role.ADMIN)
        return f"admin:{principal.token_hash[:8]}"

    async def Evaluate(
        self, request: evaluator_pb2.EvaluateRequest, context: grpc.aio.ServicerContext
    ) -> evaluator_pb2.Report:
        self._admin(context)
        if not request.version:
            raise InvalidArgument("version is required")
        self._app.registry.get(request.version)
        result = await asyncio.to_thread(self._app.evaluate_now, request.version)
        return report_message(result, self._summary(request.version))

    def _summary(self, version: str) -> str:
        folder = self._app.registry.reports_dir / version
        for name in (GATE_MD, EVALUATION_MD):
            if (folder / name).is_file():
                return (folder / name).read_text()
        return ""

    async def GetReport(
        self, request: evaluator_pb2.GetReportRequest, context: grpc.aio.ServicerContext
    ) -> evaluator_pb2.Report:
        if not request.version:
            raise InvalidArgument("version is required")
        self._app.registry.get(request.version)
        result = await asyncio.to_thread(read_stored, self._app.registry, request.version)
        if result is None:
            raise NotFound(f"{request.version} has not been evaluated")
        return report_message(result, await asyncio.to_thread(self._summary, request.version))

    async def ListDecisions(
        self, request: evaluator_pb2.ListDecisionsRequest, context: grpc.aio.ServicerContext
    ) -> evaluator_pb2.ListDecisionsResponse:
        decisions = await asyncio.to_thread(self._app.decisions.all)
        newest = list(reversed(decisions))[: min(request.limit or MAX_LIST, MAX_LIST)]
        return evaluator_pb2.ListDecisionsResponse(decisions=[d.to_proto() for d in newest])

    async def GetRollout(
        self, request: evaluator_pb2.GetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> evaluator_pb2.Rollout:
        return rollout_message(await asyncio.to_thread(self._app.registry.state))

    async def Promote(
        self, request: evaluator_pb2.VersionRequest, context: grpc.aio.ServicerContext
    ) -> evaluator_pb2.Rollout:
        actor = self._admin(context)
        move = self._app.rollout.promote
        await asyncio.to_thread(move, request.version, reason=_reason(request), actor=actor)
        return await self._after_move()

    async def Rollback(
        self, request: evaluator_pb2.VersionRequest, context: grpc.aio.ServicerContext
    ) -> evaluator_pb2.Rollout:
        actor = self._admin(context)
        move = self._app.rollout.rollback
        await asyncio.to_thread(move, request.version, reason=_reason(request), actor=actor)
        return await self._after_move()

    async def Pin(
        self, request: evaluator_pb2.VersionRequest, context: grpc.aio.ServicerContext
    ) -> evaluator_pb2.Rollout:
        actor = self._admin(context)
        move = self._app.rollout.pin
        await asyncio.to_thread(move, request.version, reason=_reason(request), actor=actor)
        return await self._after_move()

    async def SetAutoRollout(
        self, request: evaluator_pb2.SetAutoRolloutRequest, context: grpc.aio.ServicerContext
    ) -> evaluator_pb2.Rollout:
        actor = self._admin(context)
        await asyncio.to_thread(self._app.rollout.set_auto_rollout, request.enabled, actor=actor)
        return await self._after_move()

    async def _after_move(self) -> evaluator_pb2.Rollout:
        await asyncio.to_thread(self._app.refresh_gauges)
        return rollout_message(await asyncio.to_thread(self._app.registry.state))
