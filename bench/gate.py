"""Gate benchmark: how often a decision rule promotes a worse model or rejects a better one.

    uv run python bench/gate.py [--questions 18,24,50] [--trials 300] [--json PATH]

Simulates golden-set evaluations of a production model and of candidates whose true quality is
known, and runs the evaluator's own `judge` on them with each rule below. A simulated model answers
a question right (its answer contains an acceptable answer) with probability `accuracy`; a right
answer's precision is drawn around `precision` (recall is 1), so its F1 is 2P / (1 + P); a wrong
answer overlaps the acceptable answer a little now and then. Candidate and production are right on
correlated questions (the same questions are hard for both), as in real gates.

A candidate is *better* when its true F1 is at least 2 points higher and its true accuracy at most
5 points lower than production's (answers right as often and more to the point, or right more
often); *worse* when its true F1 is not higher or its accuracy is more than 5 points lower. The
table gives, per golden-set size and rule, the share of worse candidates promoted (false promotion)
and of better ones rejected (false rejection), averaged over the scenarios of each kind.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from flywheel_evaluator.evaluation import EvaluationResult, ItemResult
from flywheel_evaluator.gate import judge
from flywheel_evaluator.settings import GateSettings

BETTER_F1 = 0.02
ACCURACY_TOLERANCE = 0.05
CORRELATION = 0.5
CONCENTRATION = 4.0

# The rules compared: the rule before this bench (accuracy first), and F1 first with accuracy
# non-inferiority at the evaluator's default and the local stack's confidence.
RULES: dict[str, GateSettings] = {
    "accuracy first, P<=0.2 (old local)": GateSettings(
        primary_metric="accuracy", max_p_not_better=0.2, accuracy_tolerance=0.0, f1_tolerance=0.03
    ),
    "f1 first, P<=0.05 (default)": GateSettings(),
    "f1 first, P<=0.2 (local)": GateSettings(max_p_not_better=0.2),
    "f1 first, P<=0.2, accuracy P<=0.3": GateSettings(max_p_not_better=0.2, max_p_inferior=0.3),
    "f1 first, P<=0.1, accuracy P<=0.3": GateSettings(max_p_not_better=0.1, max_p_inferior=0.3),
}


@dataclass(frozen=True)
class Model:
    """A simulated model's true answer quality."""

    accuracy: float
    precision: float


@dataclass(frozen=True)
class Scenario:
    production: Model
    candidate: Model


def _draw(
    model: Model, latent: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-question contains, precision and F1 of one model, right where the latent is small."""
    right = latent < NormalDist().inv_cdf(min(max(model.accuracy, 1e-9), 1 - 1e-9))
    a = model.precision * CONCENTRATION
    b = (1 - model.precision) * CONCENTRATION
    precision_right = rng.beta(a, b, size=latent.size)
    partial = rng.random(latent.size) < 0.25
    precision_wrong = np.where(partial, rng.beta(0.8, 3.2, size=latent.size), 0.0)
    recall_wrong = rng.uniform(0.1, 0.6, size=latent.size)
    precision = np.where(right, precision_right, precision_wrong)
    f1_right = 2 * precision_right / (1 + precision_right)
    f1_wrong = np.where(
        precision_wrong > 0,
        2 * precision_wrong * recall_wrong / (precision_wrong + recall_wrong + 1e-12),
        0.0,
    )
    return right.astype(float), precision, np.where(right, f1_right, f1_wrong)


def _latents(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    shared = rng.standard_normal(n)
    own = rng.standard_normal((2, n))
    mix = np.sqrt(1 - CORRELATION)
    return np.sqrt(CORRELATION) * shared + mix * own[0], np.sqrt(CORRELATION) * shared + mix * own[1]


def _result(version: str, contains: np.ndarray, precision: np.ndarray, f1: np.ndarray) -> EvaluationResult:
    items = [
        ItemResult(
            id=f"q{i:03d}",
            answerable=True,
            prediction="",
            abstained=False,
            contains=float(contains[i]),
            precision=float(precision[i]),
            f1=float(f1[i]),
            exact_match=0.0,
            length=1,
            latency_ms=1000.0,
            ttft_ms=100.0,
        )
        for i in range(contains.size)
    ]
    metrics = {
        "accuracy": {"value": float(contains.mean())},
        "precision": {"value": float(precision.mean())},
        "f1": {"value": float(f1.mean())},
        "latency_p95_ms": {"value": 1000.0},
    }
    return EvaluationResult(version, "simulated", "", items, metrics)


def true_quality(model: Model, rng: np.random.Generator, n: int = 200_000) -> tuple[float, float]:
    """Expected accuracy and F1 of a model (Monte Carlo)."""
    contains, _precision, f1 = _draw(model, rng.standard_normal(n), rng)
    return float(contains.mean()), float(f1.mean())


def scenarios() -> list[Scenario]:
    """A production model like the base (a fifth right, verbose) against candidates around it."""
    production = Model(accuracy=0.20, precision=0.12)
    return [
        Scenario(production, Model(production.accuracy + d_accuracy, precision))
        for d_accuracy in (-0.10, -0.05, 0.0, 0.05, 0.10, 0.20)
        for precision in (0.08, 0.12, 0.30, 0.50)
    ]


def label(scenario: Scenario, rng: np.random.Generator) -> tuple[str, float, float]:
    """better / worse / neither, with the true accuracy and F1 differences."""
    acc_p, f1_p = true_quality(scenario.production, rng)
    acc_c, f1_c = true_quality(scenario.candidate, rng)
    d_acc, d_f1 = acc_c - acc_p, f1_c - f1_p
    if d_f1 >= BETTER_F1 and d_acc >= -ACCURACY_TOLERANCE:
        return "better", d_acc, d_f1
    if d_f1 <= 0 or d_acc < -ACCURACY_TOLERANCE:
        return "worse", d_acc, d_f1
    return "neither", d_acc, d_f1


def promotion_rate(
    scenario: Scenario, rule: GateSettings, n: int, trials: int, rng: np.random.Generator
) -> float:
    promoted = 0
    for _ in range(trials):
        latent_p, latent_c = _latents(n, rng)
        baseline = _result("v1", *_draw(scenario.production, latent_p, rng))
        candidate = _result("v2", *_draw(scenario.candidate, latent_c, rng))
        promoted += judge(candidate, baseline, rule, resamples=400).passed
    return promoted / trials


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    labelled = [(s, *label(s, rng)) for s in scenarios()]
    rows = []
    for n in args.questions:
        for name, rule in RULES.items():
            rates: dict[str, list[float]] = {"better": [], "worse": [], "neither": []}
            per_scenario = []
            for scenario, kind, _d_acc, _d_f1 in labelled:
                rate = promotion_rate(scenario, rule, n, args.trials, rng)
                rates[kind].append(rate)
                per_scenario.append(rate)
            rows.append(
                {
                    "questions": n,
                    "rule": name,
                    "false_promotion": float(np.mean(rates["worse"])),
                    "false_rejection": 1.0 - float(np.mean(rates["better"])),
                    "worst_false_promotion": float(np.max(rates["worse"])),
                    "scenarios": {k: len(v) for k, v in rates.items()},
                    "promotion_rate_per_scenario": per_scenario,
                }
            )
    return {
        "trials": args.trials,
        "seed": args.seed,
        "scenarios": [
            {
                "production": vars(s.production),
                "candidate": vars(s.candidate),
                "kind": kind,
                "true_accuracy_diff": d_acc,
                "true_f1_diff": d_f1,
            }
            for s, kind, d_acc, d_f1 in labelled
        ],
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--questions", type=lambda s: [int(x) for x in s.split(",")], default=[18, 24, 50])
    parser.add_argument("--trials", type=int, default=300, help="simulated gates per scenario and rule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    started = time.perf_counter()
    results = run(args)
    kinds = {k: sum(s["kind"] == k for s in results["scenarios"]) for k in ("better", "worse", "neither")}
    print(f"scenarios: {kinds['better']} better, {kinds['worse']} worse, {kinds['neither']} neither")
    print(f"{'questions':>9}  {'rule':<36} {'false promotion':>15} {'(worst)':>8} {'false rejection':>15}")
    for row in results["rows"]:
        print(
            f"{row['questions']:>9}  {row['rule']:<36} {row['false_promotion']:>15.1%} "
            f"{row['worst_false_promotion']:>8.1%} {row['false_rejection']:>15.1%}"
        )
    print(f"({args.trials} gates per scenario and rule, {time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
