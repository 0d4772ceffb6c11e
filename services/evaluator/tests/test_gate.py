"""The gate's checks on hand-made evaluations: the primary metric, non-inferiority, SLO, safety, errors."""

from __future__ import annotations

from flywheel_evaluator.evaluation import EvaluationResult, ItemResult, compute_metrics, is_abstention
from flywheel_evaluator.gate import judge
from flywheel_evaluator.settings import EvaluationSettings, GateSettings

PHRASES = EvaluationSettings().abstention_phrases


def item(
    i: int,
    right: bool,
    *,
    answerable: bool = True,
    abstained: bool = False,
    latency_ms: float = 1000.0,
    precision: float | None = None,
    f1: float | None = None,
    error: str = "",
) -> ItemResult:
    score = 1.0 if right else 0.0
    return ItemResult(
        id=f"q{i:03d}",
        answerable=answerable,
        prediction="" if error else "The page does not say." if abstained else "an answer",
        abstained=abstained,
        contains=score,
        precision=score if precision is None else precision,
        f1=score if f1 is None else f1,
        exact_match=score,
        length=2,
        latency_ms=latency_ms,
        ttft_ms=latency_ms / 4,
        error=error,
    )


def result(version: str, right: int, total: int = 40, **kwargs: object) -> EvaluationResult:
    """`right` of `total` answerable questions right, and the extra items in `extra`."""
    extra: list[ItemResult] = list(kwargs.pop("extra", []))  # type: ignore[call-overload]
    items = [item(i, i < right, **kwargs) for i in range(total)] + extra  # type: ignore[arg-type]
    return EvaluationResult(version, "golden@test", "fp", items, compute_metrics(items, resamples=500))


def unanswerable(n: int, fabricated: int) -> list[ItemResult]:
    return [item(100 + i, False, answerable=False, abstained=i >= fabricated) for i in range(n)]


def test_clear_improvement_passes_the_improve_policy() -> None:
    verdict = judge(result("v2", 30), result("v1", 15), GateSettings(policy="improve"), resamples=500)
    assert verdict.passed, verdict.reasons()
    assert verdict.metrics["f1_diff"] == 15 / 40
    assert verdict.metrics["p_not_better"] < 0.05
    assert all(reason.startswith("pass ") for reason in verdict.reasons())


def test_equal_model_fails_improve_but_passes_no_regression() -> None:
    same = judge(result("v2", 20), result("v1", 20), GateSettings(policy="improve"), resamples=500)
    assert not same.passed
    assert same.reasons()[0].startswith("FAIL f1: +0.0 pts")
    assert judge(result("v2", 20), result("v1", 20), GateSettings(policy="no_regression")).passed


def test_small_gain_is_noise_under_the_paired_bootstrap() -> None:
    # One more question right out of 40 clears a 2-point margin but not the bootstrap.
    verdict = judge(
        result("v2", 21), result("v1", 20), GateSettings(policy="improve", margin=0.02), resamples=500
    )
    assert verdict.metrics["f1_diff"] == 1 / 40
    assert verdict.metrics["p_not_better"] > 0.05
    assert not verdict.passed
    assert "P(not better)" in verdict.failures[0].detail


def test_regression_beyond_tolerance_fails_no_regression() -> None:
    settings = GateSettings(policy="no_regression", regression_tolerance=0.05)
    assert judge(result("v2", 19), result("v1", 20), settings).passed  # -2.5 pts
    verdict = judge(result("v2", 17), result("v1", 20), settings)  # -7.5 pts
    assert [c.name for c in verdict.failures] == ["f1", "accuracy", "precision"]


def test_concise_answers_pass_where_accuracy_first_saw_no_gain() -> None:
    # As right as production, but to the point: F1 rises on every right answer.
    concise = result("v2", 16, f1=0.9)
    verbose = result("v1", 16, f1=0.3)
    assert judge(concise, verbose, GateSettings(), resamples=500).passed
    old_rule = GateSettings(primary_metric="accuracy", max_p_not_better=0.2)
    assert [c.name for c in judge(concise, verbose, old_rule, resamples=500).failures] == ["accuracy"]


def test_shorter_but_less_often_right_fails_accuracy_non_inferiority() -> None:
    terse = result("v2", 10, f1=0.9)  # 10 right out of 40, F1 9.0 / 40
    verbose = result("v1", 16, f1=0.3)  # 16 right, F1 4.8 / 40
    verdict = judge(terse, verbose, GateSettings(accuracy_tolerance=0.05), resamples=500)
    failed = {c.name: c for c in verdict.failures}
    assert "f1" not in failed and "accuracy" in failed
    assert "P(worse by > 5.0 pts)" in failed["accuracy"].detail
    assert verdict.metrics["p_accuracy_inferior"] > 0.5


def test_precision_regression_fails_even_when_the_primary_metric_improves() -> None:
    wordy = result("v2", 30, precision=0.3)
    verdict = judge(wordy, result("v1", 15), GateSettings(policy="improve", precision_tolerance=0.05))
    assert [c.name for c in verdict.failures] == ["precision"]
    assert "P(worse by > 5.0 pts)" in verdict.failures[0].detail


def test_latency_slo() -> None:
    slow = result("v2", 30, latency_ms=9000.0)
    verdict = judge(slow, result("v1", 15), GateSettings(latency_p95_slo_ms=5000))
    assert [c.name for c in verdict.failures] == ["latency_p95"]
    assert "9000 ms; SLO 5000 ms" in verdict.failures[0].detail


def test_safety_candidate_may_not_fabricate_more_than_production() -> None:
    baseline = result("v1", 15, extra=unanswerable(6, fabricated=2))
    honest = result("v2", 30, extra=unanswerable(6, fabricated=2))
    liar = result("v3", 30, extra=unanswerable(6, fabricated=4))
    assert judge(honest, baseline, GateSettings()).passed
    verdict = judge(liar, baseline, GateSettings())
    assert [c.name for c in verdict.failures] == ["safety_unanswerable"]
    assert verdict.failures[0].detail == (
        "4/6 unanswerable questions got a made-up answer (production 2, at most 2 allowed)"
    )
    assert judge(liar, baseline, GateSettings(max_extra_fabrications=2)).passed
    capped = judge(honest, baseline, GateSettings(max_fabrication_rate=0.25))
    assert [c.name for c in capped.failures] == ["safety_unanswerable"]


def test_errors_fail_the_gate() -> None:
    broken = result("v2", 30, extra=[item(99, False, error="RuntimeError: boom")])
    verdict = judge(broken, result("v1", 15, extra=[item(99, False)]), GateSettings())
    assert [c.name for c in verdict.failures] == ["errors"]


def test_first_model_is_judged_on_absolute_checks_only() -> None:
    verdict = judge(result("v1", 5, extra=unanswerable(2, fabricated=2)), None, GateSettings())
    assert verdict.passed
    assert {c.name for c in verdict.checks} == {"latency_p95", "safety_unanswerable", "errors"}


def test_golden_items_must_match() -> None:
    try:
        judge(result("v2", 10, total=20), result("v1", 10, total=30), GateSettings())
    except ValueError as exc:
        assert "different golden items" in str(exc)
    else:
        raise AssertionError("mismatched golden sets were compared")


def test_abstention_detection() -> None:
    assert is_abstention("The page does not say.", PHRASES)
    assert is_abstention("Sorry, the page doesn\u2019t say who wrote it", PHRASES)
    assert is_abstention("THE PAGE DOES NOT SAY", PHRASES)
    assert not is_abstention("Python 3.11 says hello", PHRASES)
    assert not is_abstention("", PHRASES)


def test_metrics_split_quality_and_safety() -> None:
    items = [item(0, True), item(1, False), item(2, False, abstained=True)]
    items += unanswerable(4, fabricated=1)
    metrics = compute_metrics(items, resamples=200)
    assert metrics["accuracy"]["value"] == 1 / 3
    assert metrics["false_abstention_rate"]["value"] == 1 / 3
    assert metrics["fabrication_rate"]["value"] == 1 / 4
    assert metrics["accuracy"]["ci_low"] <= 1 / 3 <= metrics["accuracy"]["ci_high"]
    assert metrics["latency_p95_ms"]["value"] == 1000.0
