"""Rollout moves on a real registry (stub model files) with a recording emitter: canary, promote,
rollback, pin, auto-rollout, and the decisions each leaves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flywheel_common.errors import FailedPrecondition, NotFound
from flywheel_common.registry import ModelRegistry
from flywheel_evaluator.gate import Check, GateVerdict
from flywheel_evaluator.live import LiveStore, Signal
from flywheel_evaluator.rollout import DecisionLog, RolloutController
from flywheel_evaluator.settings import CanarySettings
from flywheel_proto.flywheel.events.v1 import events_pb2


def vote(version: str, at: float, rating: int, i: int) -> Signal:
    """A rating of an answer of its own, from a session of its own."""
    return Signal(version, at, "rating", rating, query_id=f"{version}-q{i}", session=f"{version}-s{i}")


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"stub")
    registry = ModelRegistry(tmp_path / "artifacts")
    for _ in range(3):
        registry.register(model, kind="test")
    registry.set_production("v1")
    return registry


class Setup:
    def __init__(self, registry: ModelRegistry, tmp_path: Path, **canary: Any) -> None:
        self.events: list[events_pb2.GateDecision] = []
        self.registry = registry
        self.store = LiveStore(tmp_path / "live.sqlite")
        self.settings = CanarySettings(
            **{"fraction": 0.5, "min_samples": 4, "min_signal_samples": 4, "min_duration_s": 0, **canary}
        )
        self.rollout = RolloutController(
            registry, self.store, DecisionLog(registry, self.events.append), self.settings
        )


def passed(version: str, baseline: str = "v1") -> GateVerdict:
    return GateVerdict(version, baseline, [Check("accuracy", True, "better")])


def test_passed_candidate_becomes_canary_and_is_promoted(registry: ModelRegistry, tmp_path: Path) -> None:
    s = Setup(registry, tmp_path)
    assert s.rollout.after_gate(passed("v2")) == "canary at 50% of sessions"
    state = registry.state()
    assert (state.production, state.canary, state.canary_fraction) == ("v1", "v2", 0.5)
    assert s.rollout.check_canary() is None  # no live signals yet
    started = s.store.canary_started("v2")
    s.store.record([vote(v, started + 1, 4, i) for v in ("v1", "v2") for i in range(4)])
    decision = s.rollout.check_canary(now=started + 5)
    assert decision is not None and decision.action == "canary_promote" and decision.passed
    state = registry.state()
    assert (state.production, state.canary) == ("v2", None)
    assert s.events[-1].outcome == events_pb2.GATE_OUTCOME_PASSED
    assert state.previous_production == "v1"


def test_bad_canary_is_rolled_back(registry: ModelRegistry, tmp_path: Path) -> None:
    s = Setup(registry, tmp_path)
    s.rollout.after_gate(passed("v2"))
    started = s.store.canary_started("v2")
    s.store.record([vote("v2", started + 1, 1, i) for i in range(4)])
    s.store.record([vote("v1", started + 1, 5, i) for i in range(4)])
    decision = s.rollout.check_canary(now=started + 5)
    assert decision is not None and decision.action == "rollback" and not decision.passed
    assert "mean rating 1.00 vs production 5.00" in decision.reasons[0]
    state = registry.state()
    assert (state.production, state.canary) == ("v1", None)
    assert registry.decisions()[-1]["action"] == "rollback"


def test_failed_gate_changes_nothing(registry: ModelRegistry, tmp_path: Path) -> None:
    s = Setup(registry, tmp_path)
    failed = GateVerdict("v2", "v1", [Check("accuracy", False, "worse")])
    assert s.rollout.after_gate(failed) == "rejected; production stays v1"
    assert registry.state().canary is None


def test_no_canary_when_disabled_or_no_production(registry: ModelRegistry, tmp_path: Path) -> None:
    s = Setup(registry, tmp_path, enabled=False)
    assert s.rollout.after_gate(passed("v2")) == "promoted to production (canary disabled)"
    assert registry.state().production == "v2"


def test_pin_and_auto_rollout_hold_candidates(registry: ModelRegistry, tmp_path: Path) -> None:
    s = Setup(registry, tmp_path)
    s.rollout.pin("v1", reason="release freeze")
    assert s.rollout.after_gate(passed("v2")) == "held: production is pinned to v1"
    with pytest.raises(FailedPrecondition):
        s.rollout.promote("v2")
    s.rollout.pin("")
    s.rollout.set_auto_rollout(False)
    assert s.rollout.after_gate(passed("v2")) == "held: automatic rollout is stopped"
    s.rollout.set_auto_rollout(True)
    assert s.rollout.after_gate(passed("v2")).startswith("canary")
    # A frozen canary is neither promoted nor rolled back.
    s.rollout.set_auto_rollout(False)
    started = s.store.canary_started("v2")
    s.store.record([vote("v2", started + 1, 1, i) for i in range(4)])
    s.store.record([vote("v1", started + 1, 5, i) for i in range(4)])
    assert s.rollout.check_canary(now=started + 5) is None
    actions = [d["action"] for d in registry.decisions()]
    assert actions == ["pin", "unpin", "auto_rollout_off", "auto_rollout_on", "auto_rollout_off"]


def test_admin_rollback_to_any_earlier_version(registry: ModelRegistry, tmp_path: Path) -> None:
    s = Setup(registry, tmp_path)
    s.rollout.promote("v2", reason="looks good")
    s.rollout.promote("v3")
    decision = s.rollout.rollback("v1", reason="ratings fell", actor="admin:abc")
    assert registry.state().production == "v1"
    assert (decision.version, decision.baseline_version, decision.action) == ("v3", "v1", "rollback")
    assert decision.reasons == ["admin:abc: ratings fell"]
    s.rollout.rollback("")  # back to the previous production
    assert registry.state().production == "v3"
    with pytest.raises(NotFound):
        s.rollout.rollback("v9")


def test_rollback_without_version_ends_a_canary(registry: ModelRegistry, tmp_path: Path) -> None:
    s = Setup(registry, tmp_path)
    s.rollout.after_gate(passed("v2"))
    decision = s.rollout.rollback("")
    state = registry.state()
    assert (state.production, state.canary, decision.version) == ("v1", None, "v2")


def test_newer_candidate_supersedes_the_canary(registry: ModelRegistry, tmp_path: Path) -> None:
    s = Setup(registry, tmp_path)
    s.rollout.after_gate(passed("v2"))
    s.rollout.after_gate(passed("v3"))
    assert registry.state().canary == "v3"
    assert [(d["version"], d["action"]) for d in registry.decisions()] == [("v2", "canary_superseded")]


def test_a_rollback_retried_after_a_failed_emit_moves_once(registry: ModelRegistry, tmp_path: Path) -> None:
    # Kafka refuses the first decision event: the call fails after the state moved; the caller retries.
    s = Setup(registry, tmp_path)
    s.rollout.promote("v2")
    s.rollout.promote("v3")
    sent: list[events_pb2.GateDecision] = []
    refuse = [True]

    def emit(event: events_pb2.GateDecision) -> None:
        if refuse.pop() if refuse else False:
            raise ConnectionError("broker unavailable")
        sent.append(event)

    s.rollout.decisions = DecisionLog(registry, emit)
    with pytest.raises(ConnectionError):
        s.rollout.rollback("", request_id="req-1")
    assert registry.state().production == "v2"
    retried = s.rollout.rollback("", request_id="req-1")
    state = registry.state()
    assert state.production == "v2" and state.previous_production == "v3"  # not back to v3 again
    assert [e.action for e in sent] == [events_pb2.DECISION_ACTION_ROLLBACK]
    assert retried.decision_id == sent[0].decision_id
    assert [d["action"] for d in registry.decisions()].count("rollback") == 1
    s.rollout.rollback("", request_id="req-2")  # a new request moves again
    assert registry.state().production == "v3"


def test_a_retried_promote_is_applied_once(registry: ModelRegistry, tmp_path: Path) -> None:
    s = Setup(registry, tmp_path)
    first = s.rollout.promote("v2", request_id="req-9")
    s.rollout.promote("v3")
    again = s.rollout.promote("v2", request_id="req-9")
    assert registry.state().production == "v3" and again.decision_id == first.decision_id
