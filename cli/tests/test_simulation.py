"""The simulation's pure parts: ratings from F1, traffic slices, rollout outcomes, the report's Markdown."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from flywheel_cli.simulation.report import ExamItem, ExamResult, Report, RoundResult, markdown
from flywheel_cli.simulation.simulate import (
    SimulationConfig,
    rating_from_f1,
    rollout_outcome,
    traffic_slices,
)
from flywheel_eval.dataset import Dataset, QAItem
from flywheel_eval.metrics import Estimate
from flywheel_proto.flywheel.evaluator.v1 import evaluator_pb2
from flywheel_proto.flywheel.events.v1 import events_pb2


@pytest.mark.parametrize(
    ("f1", "rating"), [(0.0, 1), (0.19, 1), (0.2, 2), (0.45, 3), (0.6, 4), (0.79, 4), (0.8, 5), (1.0, 5)]
)
def test_rating_follows_f1_cut_points_without_noise(f1: float, rating: int) -> None:
    assert rating_from_f1(f1, random.Random(0), noise=0.0) == rating


def test_noise_moves_a_rating_one_step_and_stays_in_range() -> None:
    rng = random.Random(3)
    moved = [rating_from_f1(0.5, rng, noise=1.0) for _ in range(200)]
    assert set(moved) == {2, 4}
    assert {rating_from_f1(1.0, rng, noise=1.0) for _ in range(200)} == {4, 5}


def _dataset(traffic: int) -> Dataset:
    items = tuple(QAItem(f"t{i}", "p", f"question {i}?", ("a",), "traffic") for i in range(traffic))
    exam = (QAItem("e0", "p", "exam?", ("a",), "exam"),)
    return Dataset(Path("ds"), {"p": "<p>a</p>"}, items + exam, "hash")


def test_traffic_is_split_evenly_without_overlap() -> None:
    slices = traffic_slices(_dataset(10), SimulationConfig(dataset=Path("ds"), rounds=3, seed=1))
    assert [len(s) for s in slices] == [4, 3, 3]
    ids = [item.id for s in slices for item in s]
    assert sorted(ids) == sorted(f"t{i}" for i in range(10))
    again = traffic_slices(_dataset(10), SimulationConfig(dataset=Path("ds"), rounds=3, seed=1))
    assert again == slices  # the seed fixes the order


def test_questions_per_round_wrap_around_the_traffic() -> None:
    config = SimulationConfig(dataset=Path("ds"), rounds=2, questions_per_round=4)
    slices = traffic_slices(_dataset(3), config)
    assert [len(s) for s in slices] == [4, 4]
    assert {item.id for s in slices for item in s} == {"t0", "t1", "t2"}


def _decision(version: str, action: str) -> evaluator_pb2.Decision:
    value = events_pb2.DecisionAction.Value(f"DECISION_ACTION_{action.upper()}")
    return evaluator_pb2.Decision(version=version, action=value, passed=True)


def test_rollout_outcome_names_the_last_move_on_a_candidate() -> None:
    decisions = [_decision("v2", "gate"), _decision("v2", "canary_promote")]
    assert rollout_outcome(["v2"], decisions, "v2") == "promoted after canary; v2 serves"
    decisions = [_decision("v3", "gate"), _decision("v3", "rollback")]
    assert rollout_outcome(["v3"], decisions, "v2") == "canary rolled back; v2 serves"
    assert rollout_outcome(["v4"], [_decision("v4", "gate")], "v2") == "v2 still serves"
    assert rollout_outcome(["v4"], [], "v4") == "promoted; v4 serves"
    assert rollout_outcome([], [], "v1") == ""


def _round(number: int, version: str, right: list[bool]) -> RoundResult:
    items = [
        ExamItem(f"e{i}", "?", "a", version, 10.0, float(ok), float(ok), float(ok))
        for i, ok in enumerate(right)
    ]
    share = sum(right) / len(right)
    est = Estimate(share, share, share)
    exam = ExamResult(len(items), est, est, est, est, est, est, {version: len(items)}, items)
    return RoundResult(number, version, exam, duration_s=60.0)


def test_markdown_tells_each_round_and_the_promotion() -> None:
    report = Report("ds", "ds@1", "2026-01-01T00:00:00+00:00", {"rounds": 1})
    report.rounds.append(_round(0, "v1", [False] * 10 + [True] * 10))
    after = _round(1, "v2", [True] * 20)
    after.jobs.append({"job_id": "j1", "state": "SUCCEEDED", "examples": 12, "candidate_version": "v2"})
    after.decisions.append(
        {"version": "v2", "baseline_version": "v1", "passed": True, "action": "gate", "reasons": ["ok"]}
    )
    after.rollout = "promoted after canary; v2 serves"
    report.rounds.append(after)
    text = markdown(report, chart_name=None)
    assert text.startswith("# Flywheel simulation: ds\n")
    assert "| 1 | v1 → v2 | 50.0% | 100.0% |" in text
    assert "### Round 1: v2 (1.0 min)" in text
    assert "- Training job `j1`: succeeded, 12 new examples" in text
    assert "- Decision on v2 vs v1: passed, action gate: ok" in text
    assert "- Rollout: promoted after canary; v2 serves" in text
    assert "![" not in text
