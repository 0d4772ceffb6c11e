"""Rollout mechanics: decisions (registry + Kafka), canary start, automatic promote/rollback, admin moves."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
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

GATE = "gate"


@dataclass
class Decision:
    """One recorded decision on a version: the gate's, the canary's or an admin's."""

    version: str
    baseline_version: str
    passed: bool
    action: str
    reasons: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    actor: str = "evaluator"
    decision_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: str = field(default_factory=now_iso)

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Decision:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

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
            action=self.action,
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
            action=self.action,
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
        return next((d for d in reversed(self.all()) if d.version == version and d.action == GATE), None)


class _Unchanged(Exception):
    """Raised inside a registry state change to leave the state as it was."""


_PRODUCTION_NOTE = re.compile(r"^production -> (\S+)")


def previous_production(state: RolloutState) -> str | None:
    """The version that was production before the current one (from the state's history)."""
    for entry in reversed(state.history):
        match = _PRODUCTION_NOTE.match(str(entry.get("note", "")))
        if match and match.group(1) != state.production:
            return match.group(1)
    return None


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
                    action="canary_superseded",
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
                action=GATE,
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
                action="canary_promote" if promote else "rollback",
                reasons=verdict.reasons,
                metrics=verdict.metrics,
            )
        )

    # Admin moves

    def _admin(self, actor: str, reason: str, default: str) -> str:
        return f"{actor}: {reason.strip() or default}"

    def promote(self, version: str, *, reason: str = "", actor: str = "admin") -> Decision:
        """Makes `version` (default: the canary) production now and ends any canary."""
        state = self.registry.state()
        version = version or state.canary or ""
        if not version:
            raise InvalidArgument("no version given and no canary running")
        self.registry.get(version)
        old = state.production or ""

        def change(state: RolloutState) -> str:
            if state.pinned:
                raise FailedPrecondition(f"production is pinned to {state.production}; unpin first")
            state.production, state.canary, state.canary_fraction = version, None, 0.0
            return f"production -> {version} (promoted by {actor})"

        self.registry.update_state(change)
        PROMOTIONS.labels("admin").inc()
        return self.decisions.record(
            Decision(
                version=version,
                baseline_version=old,
                passed=True,
                action="manual_promote",
                reasons=[self._admin(actor, reason, "promoted by an admin")],
                actor=actor,
            )
        )

    def rollback(self, version: str, *, reason: str = "", actor: str = "admin") -> Decision:
        """Serves `version` (an earlier one) as production now; without a version, ends a running canary,
        or else goes back to the previous production version."""
        state = self.registry.state()
        if state.pinned:
            raise FailedPrecondition(f"production is pinned to {state.production}; unpin first")
        removed: str
        if not version and state.canary:
            version, removed = state.production or "", state.canary
        else:
            version = version or previous_production(state) or ""
            if not version:
                raise FailedPrecondition("no earlier production version to roll back to")
            removed = state.canary or state.production or ""
        self.registry.get(version)

        def change(current: RolloutState) -> str:
            if current.pinned:
                raise FailedPrecondition(f"production is pinned to {current.production}; unpin first")
            current.production, current.canary, current.canary_fraction = version, None, 0.0
            return f"production -> {version} (rolled back by {actor}; {removed} out of service)"

        self.registry.update_state(change)
        ROLLBACKS.labels("admin").inc()
        return self.decisions.record(
            Decision(
                version=removed,
                baseline_version=version,
                passed=False,
                action="rollback",
                reasons=[self._admin(actor, reason, f"rolled back to {version} by an admin")],
                actor=actor,
            )
        )

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
                    action="unpin",
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
                action="pin",
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
                action="auto_rollout_on" if enabled else "auto_rollout_off",
                reasons=[f"{actor}: automatic rollout {'resumed' if enabled else 'stopped'}"],
                actor=actor,
            )
        )
