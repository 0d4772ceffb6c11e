"""Rollout mechanics: decisions (registry + Kafka), canary start, automatic promote/rollback, admin moves."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from flywheel_common.errors import FailedPrecondition, InvalidArgument
from flywheel_common.registry import ModelRegistry, RolloutState, now_iso
from flywheel_evaluator.gate import GateVerdict
from flywheel_evaluator.live import CanaryVerdict, LiveStore, judge_canary
from flywheel_evaluator.metrics import GATE_DECISIONS, PROMOTIONS, ROLLBACKS
from flywheel_evaluator.settings import CanarySettings
from flywheel_proto.flywheel.evaluator.v1 import evaluator_pb2
from flywheel_proto.flywheel.events.v1 import events_pb2

log = logging.getLogger(__name__)


class Action(StrEnum):
    """What a decision did; stored by this name in the registry, sent as `DecisionAction` on the wire."""

    GATE = "gate"
    CANARY_PROMOTE = "canary_promote"
    CANARY_SUPERSEDED = "canary_superseded"
    ROLLBACK = "rollback"
    MANUAL_PROMOTE = "manual_promote"
    PIN = "pin"
    UNPIN = "unpin"
    AUTO_ROLLOUT_ON = "auto_rollout_on"
    AUTO_ROLLOUT_OFF = "auto_rollout_off"

    @property
    def proto(self) -> events_pb2.DecisionAction.ValueType:
        """The action as the proto enum."""
        return events_pb2.DecisionAction.Value(f"DECISION_ACTION_{self.name}")


@dataclass
class Decision:
    """One recorded decision on a version: the gate's, the canary's or an admin's."""

    version: str
    baseline_version: str
    passed: bool
    action: Action
    reasons: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    actor: str = "evaluator"
    decision_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: str = field(default_factory=now_iso)

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Decision:
        known = set(cls.__dataclass_fields__)
        fields = {k: v for k, v in data.items() if k in known}
        return cls(**{**fields, "action": Action(fields["action"])})

    def _timestamp(self, message: Any) -> None:
        try:
            message.created_at.FromJsonString(self.created_at.replace("+00:00", "Z"))
        except ValueError:
            message.created_at.GetCurrentTime()

    def to_proto(self) -> evaluator_pb2.Decision:
        message = evaluator_pb2.Decision(
            decision_id=self.decision_id,
            version=self.version,
            baseline_version=self.baseline_version,
            passed=self.passed,
            action=self.action.proto,
            reasons=self.reasons,
            metrics=self.metrics,
        )
        self._timestamp(message)
        return message

    def to_event(self) -> events_pb2.GateDecision:
        event = events_pb2.GateDecision(
            decision_id=self.decision_id,
            version=self.version,
            baseline_version=self.baseline_version,
            outcome=events_pb2.GATE_OUTCOME_PASSED if self.passed else events_pb2.GATE_OUTCOME_FAILED,
            action=self.action.proto,
            reasons=self.reasons,
            metrics=self.metrics,
        )
        self._timestamp(event)
        return event


Emit = Callable[[events_pb2.GateDecision], None]


class DecisionLog:
    """Records decisions in the registry, then emits them on Kafka (emit raises when not acked)."""

    def __init__(self, registry: ModelRegistry, emit: Emit | None) -> None:
        self.registry = registry
        self._emit = emit

    def record(self, decision: Decision) -> Decision:
        self.registry.append_decision(asdict(decision))
        log.info(
            "decision %s on %s: %s %s",
            decision.action,
            decision.version,
            "passed" if decision.passed else "failed",
            "; ".join(decision.reasons),
        )
        self.emit(decision)
        return decision

    def emit(self, decision: Decision) -> None:
        if self._emit is not None:
            self._emit(decision.to_event())

    def all(self) -> list[Decision]:
        """Every decision, oldest first."""
        return [Decision.from_record(d) for d in self.registry.decisions()]

    def gate_decision(self, version: str) -> Decision | None:
        """The gate's decision on a version, if it was gated."""
        return next(
            (d for d in reversed(self.all()) if d.version == version and d.action == Action.GATE), None
        )

    def find(self, decision_id: str) -> Decision | None:
        """A recorded decision by its id."""
        return next((d for d in reversed(self.all()) if d.decision_id == decision_id), None)


class _Unchanged(Exception):
    """Raised inside a registry state change to leave the state as it was."""


class _Applied(Exception):
    """Raised inside a registry state change when its request id was applied before."""


class RolloutController:
    """Moves the registry's rollout pointers and records why; the only writer of the rollout state."""

    def __init__(
        self, registry: ModelRegistry, store: LiveStore, decisions: DecisionLog, settings: CanarySettings
    ) -> None:
        self.registry = registry
        self.store = store
        self.decisions = decisions
        self.settings = settings
        self.last_verdict: CanaryVerdict | None = None

    def _update(self, change: Callable[[RolloutState], str]) -> RolloutState | None:
        """Applies a change under the registry lock; None when the change declined (state moved on)."""
        try:
            return self.registry.update_state(change)
        except _Unchanged as why:
            log.info("rollout state left as it was: %s", why)
            return None

    # After the gate

    def after_gate(self, verdict: GateVerdict) -> str:
        """Starts the rollout of a candidate that passed; returns what happened, for the decision."""
        version = verdict.version
        if not verdict.passed:
            return f"rejected; production stays {verdict.baseline or '(none)'}"
        outcome: list[str] = []
        superseded: list[str] = []

        def change(state: RolloutState) -> str:
            if state.production == version:
                raise _Unchanged(f"{version} is already production")
            if state.pinned:
                raise _Unchanged(f"held: production is pinned to {state.production}")
            if not state.auto_rollout:
                raise _Unchanged("held: automatic rollout is stopped")
            if state.production is None or not self.settings.enabled:
                why = "no production model yet" if state.production is None else "canary disabled"
                state.production, state.canary, state.canary_fraction = version, None, 0.0
                outcome.append(f"promoted to production ({why})")
                return f"production -> {version} (gate passed, {why})"
            if state.canary and state.canary != version:
                superseded.append(state.canary)
            state.canary, state.canary_fraction = version, self.settings.fraction
            outcome.append(f"canary at {self.settings.fraction:.0%} of sessions")
            return f"canary -> {version} at {self.settings.fraction:.0%} (gate passed)"

        # The window starts before the state changes, so no early feedback on the canary is missed.
        self.store.start_canary(version)
        try:
            self.registry.update_state(change)
        except _Unchanged as held:
            return str(held)
        if outcome[0].startswith("promoted"):
            PROMOTIONS.labels("gate").inc()
        for old in superseded:
            self.decisions.record(
                Decision(
                    version=old,
                    baseline_version=verdict.baseline or "",
                    passed=False,
                    action=Action.CANARY_SUPERSEDED,
                    reasons=[f"a newer candidate {version} passed the gate and replaced this canary"],
                )
            )
        return outcome[0]

    def record_gate(self, verdict: GateVerdict, rollout: str, decision_id: str) -> Decision:
        """Records the gate's decision; the first reason says what the rollout did."""
        GATE_DECISIONS.labels("passed" if verdict.passed else "failed").inc()
        return self.decisions.record(
            Decision(
                decision_id=decision_id,
                version=verdict.version,
                baseline_version=verdict.baseline or "",
                passed=verdict.passed,
                action=Action.GATE,
                reasons=[f"rollout: {rollout}", *verdict.reasons()],
                metrics=verdict.metrics,
            )
        )

    # The canary

    def check_canary(self, now: float | None = None) -> Decision | None:
        """Judges a running canary on its live signals; promotes or rolls back when it is decided."""
        now = time.time() if now is None else now
        state = self.registry.state()
        canary, production = state.canary, state.production
        if not canary or not production:
            self.last_verdict = None
            return None
        if state.pinned or not state.auto_rollout:
            return None
        started = self.store.canary_started(canary, now)
        verdict = judge_canary(
            self.store.stats(canary, started, now),
            self.store.stats(production, started, now),
            now - started,
            self.settings,
        )
        self.last_verdict = verdict
        if verdict.action == "wait":
            return None
        promote = verdict.action == "promote"

        def change(state: RolloutState) -> str:
            if state.canary != canary or state.production != production:
                raise _Unchanged("the rollout changed while the canary was judged")
            if state.pinned or not state.auto_rollout:
                raise _Unchanged("the rollout was frozen while the canary was judged")
            if promote:
                state.production = canary
                note = f"production -> {canary} (canary promoted on live signals)"
            else:
                note = f"canary ended: {canary} rolled back on live signals"
            state.canary, state.canary_fraction = None, 0.0
            return note

        if self._update(change) is None:
            return None
        if promote:
            PROMOTIONS.labels("canary").inc()
        else:
            ROLLBACKS.labels("auto").inc()
        return self.decisions.record(
            Decision(
                version=canary,
                baseline_version=production,
                passed=promote,
                action=Action.CANARY_PROMOTE if promote else Action.ROLLBACK,
                reasons=verdict.reasons,
                metrics=verdict.metrics,
            )
        )

    # Admin moves

    def _admin(self, actor: str, reason: str, default: str) -> str:
        return f"{actor}: {reason.strip() or default}"

    def _replay(self, request_id: str, action: Action, actor: str) -> Decision | None:
        """The decision of a request applied before (its event sent again), or None when it is new."""
        if not request_id:
            return None
        state = self.registry.state()
        decision_id = state.requests.get(request_id)
        if decision_id is None:
            return None
        log.info("request %s was applied before (decision %s); not moving again", request_id, decision_id)
        decision = self.decisions.find(decision_id)
        if decision is None:
            # The state moved but the process stopped before the decision was written: write it now.
            return self.decisions.record(
                Decision(
                    version=state.production or "",
                    baseline_version=state.previous_production or "",
                    passed=action != Action.ROLLBACK,
                    action=action,
                    reasons=[f"{actor}: applied by an earlier attempt of this request"],
                    actor=actor,
                    decision_id=decision_id,
                )
            )
        self.decisions.emit(decision)
        return decision

    def _admin_move(
        self,
        request_id: str,
        decision: Decision,
        move: Callable[[RolloutState], str],
        count: Callable[[], None],
    ) -> Decision:
        """Applies an admin move and records its decision once per request id.

        The request id is committed with the state change, so a call retried after the decision's
        event failed (or after a crash) finds it and only sends the event again.
        """
        replayed = self._replay(request_id, decision.action, decision.actor)
        if replayed is not None:
            return replayed

        def change(state: RolloutState) -> str:
            if request_id and request_id in state.requests:
                raise _Applied
            note = move(state)
            if request_id:
                state.requests[request_id] = decision.decision_id
            return note

        try:
            self.registry.update_state(change)
        except _Applied:  # a concurrent attempt of the same request won
            replayed = self._replay(request_id, decision.action, decision.actor)
            assert replayed is not None
            return replayed
        count()
        return self.decisions.record(decision)

    def promote(
        self, version: str, *, reason: str = "", actor: str = "admin", request_id: str = ""
    ) -> Decision:
        """Makes `version` (default: the canary) production now and ends any canary."""
        replayed = self._replay(request_id, Action.MANUAL_PROMOTE, actor)
        if replayed is not None:
            return replayed
        state = self.registry.state()
        version = version or state.canary or ""
        if not version:
            raise InvalidArgument("no version given and no canary running")
        self.registry.get(version)

        def change(state: RolloutState) -> str:
            if state.pinned:
                raise FailedPrecondition(f"production is pinned to {state.production}; unpin first")
            state.production, state.canary, state.canary_fraction = version, None, 0.0
            return f"production -> {version} (promoted by {actor})"

        decision = Decision(
            version=version,
            baseline_version=state.production or "",
            passed=True,
            action=Action.MANUAL_PROMOTE,
            reasons=[self._admin(actor, reason, "promoted by an admin")],
            actor=actor,
        )
        return self._admin_move(request_id, decision, change, PROMOTIONS.labels("admin").inc)

    def rollback(
        self, version: str, *, reason: str = "", actor: str = "admin", request_id: str = ""
    ) -> Decision:
        """Serves `version` (an earlier one) as production now; without a version, ends a running canary,
        or else goes back to the previous production version."""
        replayed = self._replay(request_id, Action.ROLLBACK, actor)
        if replayed is not None:
            return replayed
        state = self.registry.state()
        if state.pinned:
            raise FailedPrecondition(f"production is pinned to {state.production}; unpin first")
        removed: str
        if not version and state.canary:
            version, removed = state.production or "", state.canary
        else:
            version = version or state.previous_production or ""
            if not version:
                raise FailedPrecondition("no earlier production version to roll back to")
            removed = state.canary or state.production or ""
        self.registry.get(version)

        def change(current: RolloutState) -> str:
            if current.pinned:
                raise FailedPrecondition(f"production is pinned to {current.production}; unpin first")
            current.production, current.canary, current.canary_fraction = version, None, 0.0
            return f"production -> {version} (rolled back by {actor}; {removed} out of service)"

        decision = Decision(
            version=removed,
            baseline_version=version,
            passed=False,
            action=Action.ROLLBACK,
            reasons=[self._admin(actor, reason, f"rolled back to {version} by an admin")],
            actor=actor,
        )
        return self._admin_move(request_id, decision, change, ROLLBACKS.labels("admin").inc)

    def pin(self, version: str, *, reason: str = "", actor: str = "admin") -> Decision:
        """Pins production to `version` (automatic rollout stops); an empty version unpins."""
        if not version:

            def unpin(state: RolloutState) -> str:
                state.pinned = False
                return f"unpinned by {actor}"

            state = self.registry.update_state(unpin)
            return self.decisions.record(
                Decision(
                    version=state.production or "",
                    baseline_version="",
                    passed=True,
                    action=Action.UNPIN,
                    reasons=[self._admin(actor, reason, "unpinned")],
                    actor=actor,
                )
            )
        self.registry.get(version)
        old = self.registry.state().production or ""

        def pin(state: RolloutState) -> str:
            state.production, state.canary, state.canary_fraction, state.pinned = version, None, 0.0, True
            return f"production -> {version} (pinned by {actor})"

        self.registry.update_state(pin)
        return self.decisions.record(
            Decision(
                version=version,
                baseline_version=old,
                passed=True,
                action=Action.PIN,
                reasons=[self._admin(actor, reason, f"pinned to {version}")],
                actor=actor,
            )
        )

    def set_auto_rollout(self, enabled: bool, *, actor: str = "admin") -> Decision:
        """Stops or resumes automatic rollout (gates still run and are recorded while stopped)."""

        def change(state: RolloutState) -> str:
            state.auto_rollout = enabled
            return f"automatic rollout {'resumed' if enabled else 'stopped'} by {actor}"

        state = self.registry.update_state(change)
        if enabled and state.canary:
            # The canary's window starts over, so signals from the frozen period do not decide it alone.
            self.store.start_canary(state.canary)
        return self.decisions.record(
            Decision(
                version=state.production or "",
                baseline_version="",
                passed=True,
                action=Action.AUTO_ROLLOUT_ON if enabled else Action.AUTO_ROLLOUT_OFF,
                reasons=[f"{actor}: automatic rollout {'resumed' if enabled else 'stopped'}"],
                actor=actor,
            )
        )
