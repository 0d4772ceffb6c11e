"""Rollout moves on a real registry (stub model files) with a recording emitter: canary, promote,
rollback, pin, auto-rollout, and the decisions each leaves."""

from __future__ import annotations

import threading
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
    assert s.rollout.after_gate(passed("v2")).reasons[0] == "rollout: canary at 50% of sessions"
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
    assert s.rollout.after_gate(failed).reasons[0] == "rollout: rejected; production stays v1"
    assert registry.state().canary is None


def test_no_canary_when_disabled_or_no_production(registry: ModelRegistry, tmp_path: Path) -> None:
    s = Setup(registry, tmp_path, enabled=False)
    assert (
        s.rollout.after_gate(passed("v2")).reasons[0] == "rollout: promoted to production (canary disabled)"
    )
    assert registry.state().production == "v2"


def test_pin_and_auto_rollout_hold_candidates(registry: ModelRegistry, tmp_path: Path) -> None:
    s = Setup(registry, tmp_path)
    s.rollout.pin("v1", reason="release freeze")
    assert s.rollout.after_gate(passed("v2")).reasons[0] == "rollout: held: production is pinned to v1"
    with pytest.raises(FailedPrecondition):
        s.rollout.promote("v2")
    s.rollout.pin("")
    s.rollout.set_auto_rollout(False)
    assert s.rollout.after_gate(passed("v2")).reasons[0] == "rollout: held: automatic rollout is stopped"
    s.rollout.set_auto_rollout(True)
    assert s.rollout.after_gate(passed("v2")).reasons[0].startswith("rollout: canary")
    # A frozen canary is neither promoted nor rolled back.
    s.rollout.set_auto_rollout(False)
    started = s.store.canary_started("v2")
    s.store.record([vote("v2", started + 1, 1, i) for i in range(4)])
    s.store.record([vote("v1", started + 1, 5, i) for i in range(4)])
    assert s.rollout.check_canary(now=started + 5) is None
    actions = [d["action"] for d in registry.decisions() if d["action"] != "gate"]
    assert actions == ["pin", "unpin", "auto_rollout_off", "auto_rollout_on", "auto_rollout_off"]


def test_admin_rollback_to_any_earlier_version(registry: ModelRegistry, tmp_path: Path) -> None:
    s = Setup(registry, tmp_path)
    s.rollout.promote("v2", reason="looks good")
    s.rollout.promote("v3")
    decision = s.rollout.rollback("v1", reason="ratings fell", actor="admin:abc")
    assert registry.state().production == "v1"
    assert (decision.version, decision.baseline_version, decision.action) == ("v3", "v1", "rollback")
    assert decision.reasons == ["admin:abc: ratings fell"]
    # Not back to v3, the version just rolled back from: without a version there is nothing earlier.
    with pytest.raises(FailedPrecondition, match="name the version"):
        s.rollout.rollback("")
    assert registry.state().production == "v1"
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
    assert [(d["version"], d["action"]) for d in registry.decisions()] == [
        ("v2", "gate"),
        ("v2", "canary_superseded"),
        ("v3", "gate"),
    ]


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
    assert state.production == "v2" and state.previous_production is None  # not back to v3 again
    assert [e.action for e in sent] == [events_pb2.DECISION_ACTION_ROLLBACK]
    assert retried.decision_id == sent[0].decision_id
    assert [d["action"] for d in registry.decisions()].count("rollback") == 1
    # A new request would roll back from v2, but nothing earlier is known: v3 is the version rolled
    # back from, so it is refused rather than put back.
    with pytest.raises(FailedPrecondition, match="name the version"):
        s.rollout.rollback("", request_id="req-2")
    s.rollout.rollback("v1", request_id="req-3")  # named, it moves
    assert registry.state().production == "v1"


def test_a_retried_promote_is_applied_once(registry: ModelRegistry, tmp_path: Path) -> None:
    s = Setup(registry, tmp_path)
    first = s.rollout.promote("v2", request_id="req-9")
    s.rollout.promote("v3")
    again = s.rollout.promote("v2", request_id="req-9")
    assert registry.state().production == "v3" and again.decision_id == first.decision_id


def test_a_second_rollback_without_a_version_does_not_bring_back_the_version_rolled_back_from(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    # Two admins answering one alert, or one admin running the command again: v2 must stay out.
    s = Setup(registry, tmp_path)
    s.rollout.promote("v2")
    s.rollout.rollback("", reason="v2 is bad", request_id="r1")
    state = registry.state()
    assert (state.production, state.previous_production) == ("v1", None)
    with pytest.raises(FailedPrecondition, match="name the version to serve"):
        s.rollout.rollback("", reason="v2 is bad", request_id="r2")
    assert registry.state().production == "v1"
    assert [d["action"] for d in registry.decisions()].count("rollback") == 1
    # A later promotion makes a previous production again.
    s.rollout.promote("v3")
    s.rollout.rollback("")
    assert registry.state().production == "v1"


def test_rollbacks_without_a_version_at_once_pick_their_target_under_the_lock(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    s = Setup(registry, tmp_path)
    s.rollout.promote("v2")
    outcomes: list[str] = []

    def roll_back(request_id: str) -> None:
        try:
            outcomes.append(s.rollout.rollback("", request_id=request_id).baseline_version)
        except FailedPrecondition:
            outcomes.append("refused")

    threads = [threading.Thread(target=roll_back, args=(f"r{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused", "v1"] and registry.state().production == "v1"


def test_a_rollback_whose_record_failed_is_recorded_on_retry_as_it_was_asked(
    registry: ModelRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The disk is full when the decision is appended, after the move: the CLI retries with the id.
    s = Setup(registry, tmp_path)
    s.rollout.promote("v2")
    append = registry.append_decision
    full = [True]

    def append_once_full(record: dict[str, Any]) -> None:
        if full.pop() if full else False:
            raise OSError(28, "No space left on device")
        append(record)

    monkeypatch.setattr(registry, "append_decision", append_once_full)
    with pytest.raises(OSError):
        s.rollout.rollback("v1", reason="v2 rates badly", actor="admin:a", request_id="r1")
    assert registry.state().production == "v1"
    retried = s.rollout.rollback("v1", reason="v2 rates badly", actor="admin:a", request_id="r1")
    assert (retried.version, retried.baseline_version) == ("v2", "v1")
    assert retried.reasons == ["admin:a: v2 rates badly"]
    last = registry.decisions()[-1]
    assert (last["action"], last["version"], last["baseline_version"]) == ("rollback", "v2", "v1")
    assert last["reasons"] == ["admin:a: v2 rates badly"] and last["decision_id"] == retried.decision_id
    assert [e.version for e in s.events if e.action == events_pb2.DECISION_ACTION_ROLLBACK] == ["v2"]
    assert registry.state().outbox == []


def test_decisions_kafka_did_not_acknowledge_are_sent_by_the_next_flush(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    s = Setup(registry, tmp_path)
    sent: list[events_pb2.GateDecision] = []
    down = [False]

    def emit(event: events_pb2.GateDecision) -> None:
        if down[0]:
            raise ConnectionError("not acknowledged")
        sent.append(event)

    s.rollout.decisions = DecisionLog(registry, emit)
    s.rollout.after_gate(passed("v2"))
    down[0] = True
    with pytest.raises(ConnectionError):
        s.rollout.after_gate(passed("v3"))  # supersedes the v2 canary
    started = s.store.canary_started("v3")
    s.store.record([vote(v, started + 1, 4, i) for v in ("v1", "v3") for i in range(4)])
    with pytest.raises(ConnectionError):
        s.rollout.check_canary(now=started + 5)
    # Recorded in order although not sent; the moves are not repeated.
    assert [(d["action"], d["version"]) for d in registry.decisions()] == [
        ("gate", "v2"),
        ("canary_superseded", "v2"),
        ("gate", "v3"),
        ("canary_promote", "v3"),
    ]
    assert registry.state().production == "v3" and len(registry.state().outbox) == 3
    down[0] = False
    s.rollout.decisions.flush()
    assert [(e.action, e.version) for e in sent] == [
        (events_pb2.DECISION_ACTION_GATE, "v2"),
        (events_pb2.DECISION_ACTION_CANARY_SUPERSEDED, "v2"),
        (events_pb2.DECISION_ACTION_GATE, "v3"),
        (events_pb2.DECISION_ACTION_CANARY_PROMOTE, "v3"),
    ]
    assert [d["action"] for d in registry.decisions()] == [
        "gate",
        "canary_superseded",
        "gate",
        "canary_promote",
    ]
    assert registry.state().outbox == []
    s.rollout.decisions.flush()  # nothing left: nothing sent twice
    assert len(sent) == 4
