"""The candidate pipeline of the app with stub evaluations (no model, no broker): decide once,
judge against the production that serves when the gate ends, fail on a broken candidate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flywheel_common.registry import ModelRegistry
from flywheel_evaluator.app import EvaluatorApp
from flywheel_evaluator.evaluation import EvaluationResult, GoldenItem, GoldenSet, ItemResult, compute_metrics
from flywheel_evaluator.settings import EvaluatorSettings, GateSettings
from flywheel_proto.flywheel.events.v1 import events_pb2

GOLDEN = GoldenSet("stub@0:gate", "gate", tuple(GoldenItem(f"q{i}", "?", ("a",), "a", "") for i in range(20)))


def result(version: str, right: int) -> EvaluationResult:
    items = [
        ItemResult(f"q{i}", True, "a", False, float(i < right), 1.0, float(i < right), 1.0, 1, 100.0, 50.0)
        for i in range(20)
    ]
    return EvaluationResult(version, GOLDEN.name, "fp", items, compute_metrics(items, resamples=200))


@pytest.fixture
def app(tmp_path: Path) -> EvaluatorApp:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"stub")
    settings = EvaluatorSettings(
        artifact_root=tmp_path / "artifacts",
        state_dir=tmp_path / "state",
        gate=GateSettings(policy="improve"),
    )
    app = EvaluatorApp(settings, golden=GOLDEN)
    for _ in range(4):
        app.registry.register(model, kind="test")
    app.registry.set_production("v1")
    app.gatekeeper.decisions._emit = None  # no broker here
    return app


class StubEvaluations:
    """Accuracy per version (None: the evaluation fails); `on_evaluate` runs before each result."""

    def __init__(self, app: EvaluatorApp, right: dict[str, int | None]) -> None:
        self.right = right
        self.calls: list[str] = []
        self.on_evaluate: Any = None
        app.gatekeeper.evaluator.evaluate = self  # type: ignore[method-assign]

    def __call__(self, version: str, **_: Any) -> EvaluationResult:
        self.calls.append(version)
        if self.on_evaluate:
            self.on_evaluate(version)
        right = self.right[version]
        if right is None:
            raise RuntimeError("model.onnx is not a model")
        return result(version, right)


def candidate(version: str) -> events_pb2.ModelCandidate:
    return events_pb2.ModelCandidate(version=version, parent_version="v1")


def test_better_candidate_goes_canary_and_is_decided_once(app: EvaluatorApp) -> None:
    stub = StubEvaluations(app, {"v1": 5, "v2": 15})
    app.gatekeeper.process_candidate(candidate("v2"))
    [decision] = app.registry.decisions()
    assert decision["passed"] and decision["reasons"][0] == "rollout: canary at 25% of sessions"
    assert app.registry.state().canary == "v2"
    assert (app.registry.reports_dir / "v2" / "gate.md").is_file()
    app.gatekeeper.process_candidate(candidate("v2"))  # a replay
    assert len(app.registry.decisions()) == 1 and stub.calls == ["v2", "v1"]


def test_candidate_is_judged_against_the_production_that_serves_when_the_gate_ends(
    app: EvaluatorApp,
) -> None:
    stub = StubEvaluations(app, {"v1": 5, "v2": 15, "v3": 12})

    def promote_v2_meanwhile(version: str) -> None:
        if version == "v3" and app.registry.state().production == "v1":
            app.registry.set_production("v2", reason="a canary finished meanwhile")

    stub.on_evaluate = promote_v2_meanwhile
    app.gatekeeper.process_candidate(candidate("v3"))
    [decision] = app.registry.decisions()
    assert decision["baseline_version"] == "v2" and not decision["passed"]
    assert stub.calls == ["v3", "v1", "v3", "v2"]


def test_broken_candidate_fails_the_gate_with_the_reason(app: EvaluatorApp) -> None:
    StubEvaluations(app, {"v1": 5, "v4": None})
    app.gatekeeper.process_candidate(candidate("v4"))
    [decision] = app.registry.decisions()
    assert not decision["passed"]
    assert decision["reasons"] == [
        "rollout: rejected; production stays v1",
        "FAIL evaluation: candidate could not be evaluated: model.onnx is not a model",
    ]


def test_unknown_version_is_not_found(app: EvaluatorApp) -> None:
    from flywheel_common.errors import NotFound

    with pytest.raises(NotFound):
        app.gatekeeper.process_candidate(candidate("v9"))


def test_registry_is_the_only_state(app: EvaluatorApp, tmp_path: Path) -> None:
    # A second app on the same folders sees the same rollout and decisions.
    StubEvaluations(app, {"v1": 5, "v2": 15})
    app.gatekeeper.process_candidate(candidate("v2"))
    again = ModelRegistry(tmp_path / "artifacts")
    assert again.state().canary == "v2" and len(again.decisions()) == 1
