"""Rollout mechanics: decisions (registry + Kafka), canary start, automatic promote/rollback, admin moves."""

from __future__ import annotations

import logging
import threading
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
# A rollout change: moves the state (or not), returns the history note ("" when nothing moved) and
# the decisions that record it.
Change = Callable[[RolloutState], tuple[str, list[Decision]]]


class DecisionLog:
    """Records decisions: each is committed to the rollout state's outbox in the same write as the move
    it records, then appended to the registry's log and produced on Kafka (emit raises when not
    acked); it leaves the outbox once Kafka has it. A crash or a failure anywhere in between leaves it
    in the outbox, and the next `flush` (every tick, every new decision) finishes it."""

    def __init__(self, registry: ModelRegistry, emit: Emit | None) -> None:
        self.registry = registry
        self._emit = emit
        # One flush at a time, so no decision is appended to the log twice.
        self._flushing = threading.Lock()

    def commit(self, change: Change, *, rollback: bool = False) -> RolloutState:
        """Applies `change` and puts the decisions it returns in the outbox, in one state write; `flush`
        then records and sends them."""

        def apply(state: RolloutState) -> str:
            note, decisions = change(state)
            state.outbox.extend(asdict(decision) for decision in decisions)
            return note

        return self.registry.update_state(apply, rollback=rollback)

    def record(self, decision: Decision) -> Decision:
        """Records and sends a decision that moves nothing (raises when Kafka does not acknowledge it)."""
        self.commit(lambda state: ("", [decision]))
        self.flush()
        return decision

    def flush(self) -> None:
        """Appends the outbox's decisions to the log (those not there yet), then produces them, oldest
        first; each leaves the outbox once produced. Stops at the first failure and raises it (the log
        stays current while Kafka is down)."""
        with self._flushing:
            pending = [Decision.from_record(d) for d in self.registry.state().outbox]
            if not pending:
                return
            logged = {d.get("decision_id") for d in self.registry.decisions()}
            for decision in pending:
                if decision.decision_id not in logged:
                    self.registry.append_decision(asdict(decision))
                    log.info(
                        "decision %s on %s: %s %s",
                        decision.action,
                        decision.version,
                        "passed" if decision.passed else "failed",
                        "; ".join(decision.reasons),
                    )
            sent: set[str] = set()
            try:
                for decision in pending:
                    self.emit(decision)
                    sent.add(decision.decision_id)
            finally:
                if sent:

                    def drop(state: RolloutState) -> str:
                        state.outbox = [d for d in state.outbox if d.get("decision_id") not in sent]
                        return ""

                    self.registry.update_state(drop)

    def emit(self, decision: Decision) -> None:
        if self._emit is not None:
            self._emit(decision.to_event())

    def send_again(self, decision: Decision) -> None:
        """A decision found again (a retry, a replay): finishes it if it is still in the outbox, else
        produces it again (same id)."""
        if any(d.get("decision_id") == decision.decision_id for d in self.registry.state().outbox):
            self.flush()
        else:
            self.emit(decision)

    def all(self) -> list[Decision]:
        """Every recorded decision, oldest first."""
        return [Decision.from_record(d) for d in self.registry.decisions()]

    def _known(self) -> list[Decision]:
        """The recorded decisions, then those still in the outbox only."""
        # The outbox first: a decision leaves it only once appended, so a flush in between cannot
        # hide it from both reads.
        pending = [Decision.from_record(d) for d in self.registry.state().outbox]
        recorded = self.all()
        ids = {d.decision_id for d in recorded}
        return recorded + [d for d in pending if d.decision_id not in ids]

    def gate_decision(self, version: str) -> Decision | None:
        """The gate's decision on a version, if it was gated (recorded, or committed and not yet)."""
        return next(
            (d for d in reversed(self._known()) if d.version == version and d.action == Action.GATE), None
        )

    def find(self, decision_id: str) -> Decision | None:
        """A decision by its id (recorded, or committed and not yet)."""
        return next((d for d in reversed(self._known()) if d.decision_id == decision_id), None)


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

    # After the gate

    def after_gate(
        self,
        verdict: GateVerdict,
        *,
        decision_id: str = "",
        write_report: Callable[[str], None] | None = None,
    ) -> Decision:
        """Records the gate's decision and starts the rollout of a candidate that passed, in one state
        write, then sends the decision. `write_report(rollout)` writes the gate report just before that
        write, so a committed decision always has its report and a retry never moves twice."""
        version = verdict.version
        decision_id = decision_id or uuid.uuid4().hex
        promoted: list[bool] = []
        made: list[Decision] = []

        def change(state: RolloutState) -> tuple[str, list[Decision]]:
            note, decisions = "", []
            if not verdict.passed:
                rollout = f"rejected; production stays {verdict.baseline or '(none)'}"
            elif state.production == version:
                rollout = f"{version} is already production"
            elif state.pinned:
                rollout = f"held: production is pinned to {state.production}"
            elif not state.auto_rollout:
                rollout = "held: automatic rollout is stopped"
            elif state.production is None or not self.settings.enabled:
                why = "no production model yet" if state.production is None else "canary disabled"
                state.production, state.canary, state.canary_fraction = version, None, 0.0
                rollout, note = (
                    f"promoted to production ({why})",
                    f"production -> {version} (gate passed, {why})",
                )
                promoted.append(True)
            else:
                if state.canary and state.canary != version:
                    decisions.append(
                        Decision(
                            version=state.canary,
                            baseline_version=verdict.baseline or "",
                            passed=False,
                            action=Action.CANARY_SUPERSEDED,
                            reasons=[f"a newer candidate {version} passed the gate and replaced this canary"],
                        )
                    )
                state.canary, state.canary_fraction = version, self.settings.fraction
                rollout = f"canary at {self.settings.fraction:.0%} of sessions"
                note = f"canary -> {version} at {self.settings.fraction:.0%} (gate passed)"
            if write_report is not None:
                write_report(rollout)
            gate = Decision(
                decision_id=decision_id,
                version=version,
                baseline_version=verdict.baseline or "",
                passed=verdict.passed,
                action=Action.GATE,
                reasons=[f"rollout: {rollout}", *verdict.reasons()],
                metrics=verdict.metrics,
            )
            made[:] = [gate]
            return note, [*decisions, gate]

        if verdict.passed:
            # The window starts before the state changes, so no early feedback on the canary is missed.
            self.store.start_canary(version)
        self.decisions.commit(change)
        GATE_DECISIONS.labels("passed" if verdict.passed else "failed").inc()
        if promoted:
            PROMOTIONS.labels("gate").inc()
        self.decisions.flush()
        return made[0]

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
        decision = Decision(
            version=canary,
            baseline_version=production,
            passed=promote,
            action=Action.CANARY_PROMOTE if promote else Action.ROLLBACK,
            reasons=verdict.reasons,
            metrics=verdict.metrics,
        )

        def change(state: RolloutState) -> tuple[str, list[Decision]]:
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
            return note, [decision]

        try:
            self.decisions.commit(change)
        except _Unchanged as why:
            log.info("rollout state left as it was: %s", why)
            return None
        if promote:
            PROMOTIONS.labels("canary").inc()
        else:
            ROLLBACKS.labels("auto").inc()
        self.decisions.flush()
        return decision

    # Admin moves

    def _admin(self, actor: str, reason: str, default: str) -> str:
        return f"{actor}: {reason.strip() or default}"

    def _replay(self, request_id: str) -> Decision | None:
        """The decision of a request applied before (finished and sent again), or None when it is new."""
        if not request_id:
            return None
        decision_id = self.registry.state().requests.get(request_id)
        if decision_id is None:
            return None
        log.info("request %s was applied before (decision %s); not moving again", request_id, decision_id)
        decision = self.decisions.find(decision_id)
        if decision is None:
            # The decision is committed with the request id; only an evaluator from before the outbox
            # can have stopped between the two.
            raise FailedPrecondition(
                f"request {request_id} was applied but its decision was not recorded; see `rollout status`"
            )
        self.decisions.send_again(decision)
        return decision

    def _apply(
        self,
        change: Change,
        *,
        request_id: str = "",
        applied: Callable[[], None] | None = None,
        rollback: bool = False,
    ) -> Decision:
        """Applies an admin move with its decision in one state write (`applied` runs right after it),
        then sends the decision; once per request id.

        The request id is committed with the move and its decision, so a call retried after the
        decision's event failed (or after a crash) finds it and only finishes sending it.
        """
        replayed = self._replay(request_id)
        if replayed is not None:
            return replayed
        made: list[Decision] = []

        def apply(state: RolloutState) -> tuple[str, list[Decision]]:
            if request_id and request_id in state.requests:
                raise _Applied
            note, decisions = change(state)
            if request_id:
                state.requests[request_id] = decisions[0].decision_id
            made[:] = decisions
            return note, decisions

        try:
            self.decisions.commit(apply, rollback=rollback)
        except _Applied:  # a concurrent attempt of the same request won
            replayed = self._replay(request_id)
            assert replayed is not None
            return replayed
        if applied is not None:
            applied()
        self.decisions.flush()
        return made[0]

    def promote(
        self, version: str, *, reason: str = "", actor: str = "admin", request_id: str = ""
    ) -> Decision:
        """Makes `version` (default: the canary) production now and ends any canary."""
        if version:
            self.registry.get(version)  # NotFound before anything moves

        def change(state: RolloutState) -> tuple[str, list[Decision]]:
            if state.pinned:
                raise FailedPrecondition(f"production is pinned to {state.production}; unpin first")
            target = version or state.canary or ""
            if not target:
                raise InvalidArgument("no version given and no canary running")
            decision = Decision(
                version=target,
                baseline_version=state.production or "",
                passed=True,
                action=Action.MANUAL_PROMOTE,
                reasons=[self._admin(actor, reason, "promoted by an admin")],
                actor=actor,
            )
            state.production, state.canary, state.canary_fraction = target, None, 0.0
            return f"production -> {target} (promoted by {actor})", [decision]

        return self._apply(change, request_id=request_id, applied=PROMOTIONS.labels("admin").inc)

    def rollback(
        self, version: str, *, reason: str = "", actor: str = "admin", request_id: str = ""
    ) -> Decision:
        """Serves `version` (an earlier one) as production now; without a version, ends a running canary,
        or else goes back to the previous production version (none right after a rollback: the
        version before it is the one just rolled back from)."""
        if version:
            self.registry.get(version)  # NotFound before anything moves

        # Decided under the registry lock, so two rollbacks at once cannot both pick the same target.
        def change(state: RolloutState) -> tuple[str, list[Decision]]:
            if state.pinned:
                raise FailedPrecondition(f"production is pinned to {state.production}; unpin first")
            if not version and state.canary:
                target, removed = state.production or "", state.canary
            else:
                target = version or state.previous_production or ""
                if not target:
                    raise FailedPrecondition(
                        "no earlier production version to roll back to (after a rollback there is none: "
                        "the version before is the one rolled back from); name the version to serve"
                    )
                removed = state.canary or state.production or ""
            decision = Decision(
                version=removed,
                baseline_version=target,
                passed=False,
                action=Action.ROLLBACK,
                reasons=[self._admin(actor, reason, f"rolled back to {target} by an admin")],
                actor=actor,
            )
            state.production, state.canary, state.canary_fraction = target, None, 0.0
            return f"production -> {target} (rolled back by {actor}; {removed} out of service)", [decision]

        return self._apply(
            change, request_id=request_id, applied=ROLLBACKS.labels("admin").inc, rollback=True
        )

    def pin(self, version: str, *, reason: str = "", actor: str = "admin") -> Decision:
        """Pins production to `version` (automatic rollout stops); an empty version unpins."""
        if not version:

            def unpin(state: RolloutState) -> tuple[str, list[Decision]]:
                state.pinned = False
                decision = Decision(
                    version=state.production or "",
                    baseline_version="",
                    passed=True,
                    action=Action.UNPIN,
                    reasons=[self._admin(actor, reason, "unpinned")],
                    actor=actor,
                )
                return f"unpinned by {actor}", [decision]

            return self._apply(unpin)
        self.registry.get(version)

        def pin(state: RolloutState) -> tuple[str, list[Decision]]:
            decision = Decision(
                version=version,
                baseline_version=state.production or "",
                passed=True,
                action=Action.PIN,
                reasons=[self._admin(actor, reason, f"pinned to {version}")],
                actor=actor,
            )
            state.production, state.canary, state.canary_fraction, state.pinned = version, None, 0.0, True
            return f"production -> {version} (pinned by {actor})", [decision]

        return self._apply(pin)

    def set_auto_rollout(self, enabled: bool, *, actor: str = "admin") -> Decision:
        """Stops or resumes automatic rollout (gates still run and are recorded while stopped)."""
        canary: list[str] = []

        def change(state: RolloutState) -> tuple[str, list[Decision]]:
            state.auto_rollout = enabled
            canary[:] = [state.canary] if state.canary else []
            decision = Decision(
                version=state.production or "",
                baseline_version="",
                passed=True,
                action=Action.AUTO_ROLLOUT_ON if enabled else Action.AUTO_ROLLOUT_OFF,
                reasons=[f"{actor}: automatic rollout {'resumed' if enabled else 'stopped'}"],
                actor=actor,
            )
            return f"automatic rollout {'resumed' if enabled else 'stopped'} by {actor}", [decision]

        def restart_window() -> None:
            if enabled and canary:
                # The canary's window starts over, so signals from the frozen period do not decide it alone.
                self.store.start_canary(canary[0])

        return self._apply(change, applied=restart_window)
