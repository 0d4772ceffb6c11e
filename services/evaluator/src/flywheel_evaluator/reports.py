"""The reports written next to a version in the registry (an evaluation's, a gate's) and their file names."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from flywheel_common.registry import ModelRegistry

if TYPE_CHECKING:
    from flywheel_evaluator.evaluation import EvaluationResult
    from flywheel_evaluator.gate import GateVerdict

EVALUATION_MD = "evaluation.md"
GATE_JSON = "gate.json"
GATE_MD = "gate.md"

# Metric, label, and whether it is a share (shown in %) or milliseconds.
_ROWS: tuple[tuple[str, str, str], ...] = (
    ("accuracy", "Accuracy (answer contained)", "pct"),
    ("precision", "Precision (tokens)", "pct"),
    ("f1", "F1", "pct"),
    ("exact_match", "Exact match", "pct"),
    ("answer_length", "Answer length (tokens)", "num"),
    ("false_abstention_rate", "Abstained on answerable", "pct"),
    ("fabrication_rate", "Made up an answer to unanswerable", "pct"),
    ("error_rate", "Errors", "pct"),
    ("latency_p50_ms", "Latency p50 (ms)", "ms"),
    ("latency_p95_ms", "Latency p95 (ms)", "ms"),
    ("ttft_p50_ms", "Time to first token p50 (ms)", "ms"),
    ("ttft_p95_ms", "Time to first token p95 (ms)", "ms"),
)


def _value(metric: dict[str, float] | None, kind: str, with_ci: bool = True) -> str:
    if not metric or metric.get("value") is None or math.isnan(metric["value"]):
        return "n/a"

    def fmt(x: float) -> str:
        return f"{x * 100:.1f}%" if kind == "pct" else f"{x:.0f}" if kind == "ms" else f"{x:.1f}"

    text = fmt(metric["value"])
    if with_ci and "ci_low" in metric:
        text += f" [{fmt(metric['ci_low'])}, {fmt(metric['ci_high'])}]"
    return text


def evaluation_markdown(result: EvaluationResult) -> str:
    """One version's metrics with their 95% intervals, and the answers it got wrong."""
    answerable, unanswerable = result.answerable, result.unanswerable
    lines = [
        f"# Evaluation of {result.version}",
        "",
        f"Golden set `{result.golden_set}`: {len(result.items)} questions ({len(answerable)} answerable, "
        f"{len(unanswerable)} unanswerable), evaluated {result.created_at} in {result.duration_s:.0f} s.",
        "Quality metrics are over the answerable questions; 95% bootstrap intervals in brackets.",
        "",
        "| Metric | Value [95% CI] |",
        "|---|---|",
    ]
    for name, label, kind in _ROWS:
        if name in result.metrics:
            lines.append(f"| {label} | {_value(result.metrics[name], kind)} |")
    misses = [item for item in answerable if not item.contains][:15]
    fabricated = [item for item in unanswerable if item.fabricated]
    if misses:
        lines += ["", "## Missed (first 15)", ""]
        lines += [f"- `{item.id}`: {_quote(item.prediction)}" for item in misses]
    if fabricated:
        lines += ["", "## Made-up answers to unanswerable questions", ""]
        lines += [f"- `{item.id}`: {_quote(item.prediction)}" for item in fabricated]
    return "\n".join(lines) + "\n"


def _quote(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return f"“{text}”" if text else "(empty)"


def gate_json(
    verdict: GateVerdict,
    candidate: EvaluationResult | None,
    baseline: EvaluationResult | None,
    *,
    decision_id: str,
    action: str,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """The gate report: decision, every check, both versions' metrics, and the questions that changed."""
    changed = []
    if candidate is not None and baseline is not None:
        base = {item.id: item for item in baseline.items}
        for item in candidate.items:
            before = base.get(item.id)
            if before is None:
                continue
            if item.answerable and item.contains != before.contains:
                changed.append(
                    {
                        "id": item.id,
                        "now": "right" if item.contains else "wrong",
                        "candidate": item.prediction,
                        "production": before.prediction,
                    }
                )
            elif not item.answerable and item.fabricated != before.fabricated:
                changed.append(
                    {
                        "id": item.id,
                        "now": "made up" if item.fabricated else "abstains",
                        "candidate": item.prediction,
                        "production": before.prediction,
                    }
                )
    return {
        "kind": "gate",
        "decision_id": decision_id,
        "version": verdict.version,
        "baseline_version": verdict.baseline,
        "passed": verdict.passed,
        "action": action,
        "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in verdict.checks],
        "metrics": verdict.metrics,
        "golden_set": candidate.golden_set if candidate else None,
        "candidate": candidate.metrics if candidate else None,
        "baseline": baseline.metrics if baseline else None,
        "changed": changed,
        "settings": settings,
    }


def gate_markdown(report: dict[str, Any]) -> str:
    """The gate report for people: the outcome, the checks, the metrics side by side."""
    version, baseline = report["version"], report["baseline_version"]
    outcome = "PASSED" if report["passed"] else "FAILED"
    lines = [
        f"# Gate: {version} {outcome}",
        "",
        f"Candidate `{version}` against production `{baseline or '(none)'}` on `{report['golden_set']}`.",
        f"Decision `{report['decision_id']}`; next: {report['action']}.",
        "",
        "| Check | Result | Detail |",
        "|---|---|---|",
    ]
    for check in report["checks"]:
        lines.append(f"| {check['name']} | {'pass' if check['passed'] else '**FAIL**'} | {check['detail']} |")
    cand, base = report.get("candidate") or {}, report.get("baseline") or {}
    if cand:
        lines += ["", f"| Metric | {version} | {baseline or 'production'} |", "|---|---|---|"]
        for name, label, kind in _ROWS:
            if name in cand or name in base:
                lines.append(f"| {label} | {_value(cand.get(name), kind)} | {_value(base.get(name), kind)} |")
    if report["changed"]:
        lines += ["", "## Questions that changed", ""]
        for row in report["changed"][:30]:
            lines.append(
                f"- `{row['id']}` now {row['now']}: {_quote(row['candidate'])} "
                f"(production: {_quote(row['production'])})"
            )
    return "\n".join(lines) + "\n"


def write_evaluation(registry: ModelRegistry, result: EvaluationResult) -> None:
    """Writes an evaluation's Markdown summary next to its version."""
    registry.write_report(result.version, EVALUATION_MD, evaluation_markdown(result))


def write_gate(registry: ModelRegistry, version: str, report: dict[str, Any]) -> None:
    """Writes the gate report (JSON for tools, Markdown for people) next to the candidate."""
    registry.write_report(version, GATE_JSON, json.dumps(report, indent=1))
    registry.write_report(version, GATE_MD, gate_markdown(report))


def summary(registry: ModelRegistry, version: str) -> str:
    """A version's summary for people: its gate report when it was gated, else its evaluation's."""
    folder = registry.reports_dir / version
    for name in (GATE_MD, EVALUATION_MD):
        if (folder / name).is_file():
            return (folder / name).read_text()
    return ""
