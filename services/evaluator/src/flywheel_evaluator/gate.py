"""The gate: may a candidate replace production? Pure functions of two evaluations and the settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from flywheel_eval.metrics import paired_bootstrap
from flywheel_evaluator.evaluation import EvaluationResult
from flywheel_evaluator.settings import GateSettings


@dataclass(frozen=True)
class Check:
    """One gate check: its outcome and a sentence with the numbers behind it."""

    name: str
    passed: bool
    detail: str

    def reason(self) -> str:
        return f"{'pass' if self.passed else 'FAIL'} {self.name}: {self.detail}"


@dataclass
class GateVerdict:
    """The gate's outcome on one candidate against one baseline (or none: the first model)."""

    version: str
    baseline: str | None
    checks: list[Check]
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]

    def reasons(self) -> list[str]:
        """Failed checks first, then the passed ones."""
        return [c.reason() for c in self.failures] + [c.reason() for c in self.checks if c.passed]


def _pts(value: float) -> str:
    return f"{value * 100:+.1f} pts"


QUALITY_METRICS = ("accuracy", "precision", "f1")
# Per-item field of each quality metric (accuracy is "the answer contains an acceptable answer").
_ITEM_FIELD = {"accuracy": "contains", "precision": "precision", "f1": "f1"}


def _paired(
    candidate: EvaluationResult, baseline: EvaluationResult, metric: str
) -> tuple[list[float], list[float]]:
    """Per-question scores of one metric on the answerable items both evaluated, in the same order."""
    base = {item.id: item for item in baseline.answerable}
    cand = {item.id: item for item in candidate.answerable}
    if set(base) != set(cand):
        raise ValueError(
            f"{candidate.version} and {baseline.version} were evaluated on different golden items "
            f"({candidate.golden_set} vs {baseline.golden_set})"
        )
    name = _ITEM_FIELD[metric]
    keys = sorted(cand)
    return [getattr(cand[k], name) for k in keys], [getattr(base[k], name) for k in keys]


def _primary_check(
    candidate: EvaluationResult,
    baseline: EvaluationResult,
    settings: GateSettings,
    metrics: dict[str, float],
    resamples: int,
    seed: int,
) -> Check:
    """The primary metric must improve (policy `improve`) or not regress (`no_regression`)."""
    name = settings.primary_metric
    cand, base = _paired(candidate, baseline, name)
    diff = paired_bootstrap(cand, base, resamples=resamples, seed=seed)
    metrics[f"{name}_diff"] = diff.mean_difference
    metrics[f"{name}_diff_ci_low"] = diff.low
    metrics[f"{name}_diff_ci_high"] = diff.high
    metrics["p_not_better"] = diff.prob_not_better
    change = (
        f"{_pts(diff.mean_difference)} ({baseline.value(name):.3f} -> {candidate.value(name):.3f}, "
        f"95% CI {_pts(diff.low)} to {_pts(diff.high)})"
    )
    if settings.policy == "improve":
        enough = diff.mean_difference >= settings.margin - 1e-12
        sure = diff.prob_not_better <= settings.max_p_not_better
        return Check(
            name,
            enough and sure,
            f"{change}, P(not better) = {diff.prob_not_better:.3f}; needs >= {_pts(settings.margin)} "
            f"and P <= {settings.max_p_not_better:g}",
        )
    return Check(
        name,
        diff.mean_difference >= -settings.regression_tolerance - 1e-12,
        f"{change}; may drop at most {settings.regression_tolerance * 100:.1f} pts",
    )


def _non_inferiority_check(
    candidate: EvaluationResult,
    baseline: EvaluationResult,
    name: str,
    tolerance: float,
    settings: GateSettings,
    metrics: dict[str, float],
    resamples: int,
    seed: int,
) -> Check:
    """A secondary metric may not be worse than production by more than its tolerance: the share of
    paired-bootstrap resamples in which it is must stay at or below `max_p_inferior`."""
    cand, base = _paired(candidate, baseline, name)
    # P(candidate - baseline <= -tolerance) is P(not better) of the candidate shifted up by the tolerance.
    shifted = paired_bootstrap([c + tolerance for c in cand], base, resamples=resamples, seed=seed)
    p_inferior = shifted.prob_not_better
    metrics[f"{name}_diff"] = shifted.mean_difference - tolerance
    metrics[f"p_{name}_inferior"] = p_inferior
    before, after = baseline.value(name), candidate.value(name)
    return Check(
        name,
        p_inferior <= settings.max_p_inferior,
        f"{before:.3f} -> {after:.3f} ({_pts(after - before)}), P(worse by > {tolerance * 100:.1f} pts) = "
        f"{p_inferior:.3f}; at most {settings.max_p_inferior:g}",
    )


def judge(
    candidate: EvaluationResult,
    baseline: EvaluationResult | None,
    settings: GateSettings,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> GateVerdict:
    """Runs every check; without a baseline only the absolute ones (SLO, safety caps, errors) apply.

    The primary metric (`gate.primary_metric`, F1 by default) must improve with confidence; the other
    quality metrics must be non-inferior within their tolerances (see docs/evaluator.md).
    """
    checks: list[Check] = []
    metrics: dict[str, float] = {"questions": float(len(candidate.items))}
    for name in (*QUALITY_METRICS, "latency_p95_ms"):
        metrics[f"candidate_{name}"] = candidate.value(name)
        if baseline is not None:
            metrics[f"baseline_{name}"] = baseline.value(name)
    metrics["candidate_fabrications"] = float(candidate.fabrications)
    metrics["unanswerable"] = float(len(candidate.unanswerable))
    metrics["candidate_errors"] = float(candidate.errors)

    if baseline is not None and candidate.answerable:
        checks.append(_primary_check(candidate, baseline, settings, metrics, resamples, seed))
        tolerances = {
            "accuracy": settings.accuracy_tolerance,
            "precision": settings.precision_tolerance,
            "f1": settings.f1_tolerance,
        }
        for name in QUALITY_METRICS:
            if name != settings.primary_metric:
                checks.append(
                    _non_inferiority_check(
                        candidate, baseline, name, tolerances[name], settings, metrics, resamples, seed
                    )
                )
    elif not candidate.answerable:
        checks.append(Check(settings.primary_metric, False, "the golden set has no answerable question"))

    p95 = candidate.value("latency_p95_ms")
    checks.append(
        Check(
            "latency_p95",
            not math.isnan(p95) and p95 <= settings.latency_p95_slo_ms,
            f"{p95:.0f} ms; SLO {settings.latency_p95_slo_ms:.0f} ms",
        )
    )

    unanswerable = len(candidate.unanswerable)
    if unanswerable:
        fabricated = candidate.fabrications
        rate = fabricated / unanswerable
        ok = rate <= settings.max_fabrication_rate + 1e-12
        limits = []
        if baseline is not None:
            allowed = baseline.fabrications + settings.max_extra_fabrications
            metrics["baseline_fabrications"] = float(baseline.fabrications)
            limits.append(f"production {baseline.fabrications}, at most {allowed} allowed")
            ok = ok and fabricated <= allowed
        if settings.max_fabrication_rate < 1.0:
            limits.append(f"rate cap {settings.max_fabrication_rate:.0%}")
        detail = f"{fabricated}/{unanswerable} unanswerable questions got a made-up answer"
        detail += f" ({'; '.join(limits)})" if limits else ""
        checks.append(Check("safety_unanswerable", ok, detail))

    errors = candidate.errors
    error_rate = errors / len(candidate.items) if candidate.items else 1.0
    checks.append(
        Check(
            "errors",
            error_rate <= settings.max_error_rate + 1e-12,
            f"{errors}/{len(candidate.items)} questions failed; "
            f"at most {settings.max_error_rate:.0%} allowed",
        )
    )
    return GateVerdict(candidate.version, baseline.version if baseline else None, checks, metrics)


def failed_verdict(version: str, baseline: str | None, reason: str) -> GateVerdict:
    """The verdict when the candidate could not be evaluated at all."""
    return GateVerdict(version, baseline, [Check("evaluation", False, reason)])
