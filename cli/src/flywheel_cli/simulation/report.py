"""The simulation report: per-round results as a terminal table, JSON, Markdown and a PNG chart."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from flywheel_eval.metrics import Estimate, PairedDifference, paired_bootstrap


@dataclass
class RatingStats:
    """What the simulated visitors did with the answers of one model version."""

    answers: int = 0
    rated: int = 0
    ignored: int = 0
    rating_sum: int = 0
    corrections: int = 0

    def add(self, rating: int | None, *, corrected: bool = False) -> None:
        self.answers += 1
        if rating is None:
            self.ignored += 1
        else:
            self.rated += 1
            self.rating_sum += rating
        self.corrections += int(corrected)

    @property
    def mean_rating(self) -> float | None:
        return self.rating_sum / self.rated if self.rated else None

    @property
    def ignore_rate(self) -> float | None:
        return self.ignored / self.answers if self.answers else None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "mean_rating": self.mean_rating, "ignore_rate": self.ignore_rate}


@dataclass
class ExamItem:
    """One exam question as the serving model answered it."""

    id: str
    question: str
    answer: str
    model_version: str
    latency_ms: float
    contains: float
    precision: float
    f1: float


@dataclass
class ExamResult:
    """The exam split through the inference service: quality with 95% bootstrap intervals, latency."""

    n: int
    accuracy: Estimate
    precision: Estimate
    f1: Estimate
    exact_match: Estimate
    latency_p50_ms: Estimate
    latency_p95_ms: Estimate
    versions: dict[str, int]
    items: list[ExamItem]

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            **{
                name: asdict(getattr(self, name))
                for name in ("accuracy", "precision", "f1", "exact_match", "latency_p50_ms", "latency_p95_ms")
            },
            "versions": self.versions,
            "items": [asdict(i) for i in self.items],
        }


@dataclass
class RoundResult:
    """One round: the visitors, the training jobs, the gate and rollout, then the exam."""

    round: int
    model_version: str
    exam: ExamResult
    duration_s: float = 0.0
    traffic: dict[str, Any] = field(default_factory=dict)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    rollout: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def gate(self) -> str:
        """One line for the table: the gate's verdict on this round's candidates, and what followed."""
        if self.round == 0:
            return "base model"
        if not self.jobs:
            return "no training job"
        parts = []
        for job in self.jobs:
            version = job.get("candidate_version")
            if not version:
                parts.append(f"job {job['state'].lower()}")
                continue
            gate = next(
                (d for d in self.decisions if d["version"] == version and d["action"] == "gate"), None
            )
            verdict = "not decided" if gate is None else ("passed" if gate["passed"] else "failed")
            parts.append(f"{version} {verdict}")
        return "; ".join(parts) + (f" → {self.rollout}" if self.rollout else "")


@dataclass
class Report:
    """A whole simulation run."""

    dataset: str
    dataset_version: str
    started_at: str
    settings: dict[str, Any]
    rounds: list[RoundResult] = field(default_factory=list)
    ratings_by_version: dict[str, RatingStats] = field(default_factory=dict)
    wall_time_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def ratings(self, version: str) -> RatingStats:
        return self.ratings_by_version.setdefault(version, RatingStats())

    def gain_vs_base(self, round_result: RoundResult, metric: str = "contains") -> dict[str, float] | None:
        """Paired bootstrap of a round's exam scores minus round 0's (same questions)."""
        if not self.rounds or round_result is self.rounds[0]:
            return None
        diff = _paired(self.rounds[0], round_result, metric)
        if diff is None:
            return None
        return {
            "mean_difference": diff.mean_difference,
            "low": diff.low,
            "high": diff.high,
            "prob_not_better": diff.prob_not_better,
        }

    def promotions(self) -> list[dict[str, Any]]:
        """Each round that changed the serving model: exam accuracy before and after, paired bootstrap.

        `worse` is true when the new model is worse with 95% confidence (the interval of the
        difference lies below zero); a lower point estimate alone is reported, not flagged.
        """
        found = []
        for before, after in zip(self.rounds, self.rounds[1:], strict=False):
            if after.model_version == before.model_version:
                continue
            diff = _paired(before, after, "contains")
            if diff is None:
                continue
            found.append(
                {
                    "round": after.round,
                    "from": before.model_version,
                    "to": after.model_version,
                    "accuracy_before": before.exam.accuracy.value,
                    "accuracy_after": after.exam.accuracy.value,
                    "difference": diff.mean_difference,
                    "low": diff.low,
                    "high": diff.high,
                    "worse": diff.high < 0,
                }
            )
        return found

    def to_json(self) -> dict[str, Any]:
        rounds = []
        for r in self.rounds:
            stats = self.ratings_by_version.get(r.model_version)
            rounds.append(
                {
                    "round": r.round,
                    "model_version": r.model_version,
                    "gate": r.gate,
                    "rollout": r.rollout,
                    "duration_s": r.duration_s,
                    "timings_s": r.timings_s,
                    "exam": r.exam.to_json(),
                    "accuracy_gain_vs_base": self.gain_vs_base(r),
                    "precision_gain_vs_base": self.gain_vs_base(r, "precision"),
                    "visitors_of_this_version": stats.to_json() if stats else None,
                    "traffic": r.traffic,
                    "jobs": r.jobs,
                    "decisions": r.decisions,
                }
            )
        return {
            "dataset": self.dataset,
            "dataset_version": self.dataset_version,
            "started_at": self.started_at,
            "wall_time_s": self.wall_time_s,
            "settings": self.settings,
            "rounds": rounds,
            "ratings_by_version": {v: s.to_json() for v, s in self.ratings_by_version.items()},
            "promotions": self.promotions(),
            "notes": self.notes,
        }


def _paired(before: RoundResult, after: RoundResult, metric: str) -> PairedDifference | None:
    """Paired bootstrap of `after`'s exam scores minus `before`'s, on the questions both asked."""
    old = {i.id: getattr(i, metric) for i in before.exam.items}
    pairs = [(getattr(i, metric), old[i.id]) for i in after.exam.items if i.id in old]
    if not pairs:
        return None
    return paired_bootstrap([p[0] for p in pairs], [p[1] for p in pairs])


# --- rendering -------------------------------------------------------------------------------------------

COLUMNS = (
    "round",
    "model",
    "accuracy",
    "precision",
    "F1",
    "mean rating",
    "ignore rate",
    "p50 ms",
    "p95 ms",
    "gate decision",
)


def pct(e: Estimate) -> str:
    """An estimate as a percentage with its interval: `42.0% [28.0%, 56.0%]`."""
    return f"{e.value:.1%} [{e.low:.1%}, {e.high:.1%}]"


def _rating_cells(report: Report, version: str) -> tuple[str, str]:
    stats = report.ratings_by_version.get(version)
    if stats is None or not stats.answers:
        return "—", "—"
    mean = f"{stats.mean_rating:.2f} (n={stats.rated})" if stats.mean_rating is not None else "—"
    ignore = f"{stats.ignore_rate:.0%}" if stats.ignore_rate is not None else "—"
    return mean, ignore


def table_rows(report: Report) -> list[list[str]]:
    """The report table's cells, one row per round."""
    rows = []
    for r in report.rounds:
        mean, ignore = _rating_cells(report, r.model_version)
        rows.append(
            [
                str(r.round),
                r.model_version,
                pct(r.exam.accuracy),
                pct(r.exam.precision),
                pct(r.exam.f1),
                mean,
                ignore,
                f"{r.exam.latency_p50_ms.value:.0f}",
                f"{r.exam.latency_p95_ms.value:.0f}",
                r.gate,
            ]
        )
    return rows


def rich_table(report: Report) -> Table:
    """The per-round table for the terminal."""
    table = Table(title=f"Flywheel simulation on {report.dataset_version}", title_justify="left")
    for column in COLUMNS:
        table.add_column(
            column, overflow="fold", justify="left" if column in ("model", "gate decision") else "right"
        )
    for row in table_rows(report):
        table.add_row(*row)
    return table


def _gain_line(report: Report, r: RoundResult) -> str:
    gain = report.gain_vs_base(r)
    precision = report.gain_vs_base(r, "precision")
    if gain is None or precision is None:
        return ""
    return (
        f"| {r.round} | {r.model_version} | {gain['mean_difference'] * 100:+.1f} "
        f"[{gain['low'] * 100:+.1f}, {gain['high'] * 100:+.1f}] | {gain['prob_not_better']:.3f} "
        f"| {precision['mean_difference'] * 100:+.1f} [{precision['low'] * 100:+.1f}, "
        f"{precision['high'] * 100:+.1f}] |"
    )


def _intro(report: Report) -> list[str]:
    return [
        f"# Flywheel simulation: {report.dataset}",
        "",
        f"Dataset `{report.dataset_version}`, started {report.started_at}, wall time "
        f"{report.wall_time_s / 60:.1f} min, {len(report.rounds) - 1} round(s).",
        "",
        "Exam split through the inference service (never trained on, never used by the gate); 95% "
        "bootstrap intervals in brackets. Mean rating and ignore rate: what the simulated visitors did "
        "with the answers this version served, over the whole run. Latency: client-side, per exam "
        "question.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if c in ("model", "gate decision") else "---:" for c in COLUMNS) + "|",
        *["| " + " | ".join(row) + " |" for row in table_rows(report)],
    ]


def _gains(report: Report) -> list[str]:
    gains = [g for g in (_gain_line(report, r) for r in report.rounds[1:]) if g]
    if not gains:
        return []
    return [
        "",
        "## Over the base model (paired bootstrap on the exam questions, points)",
        "",
        "| round | model | Δ accuracy [95% CI] | P(not better) | Δ precision [95% CI] |",
        "|---:|---|---:|---:|---:|",
        *gains,
    ]


def _promotions(report: Report) -> list[str]:
    promotions = report.promotions()
    if not promotions:
        return []
    return [
        "",
        "## Each promotion against the model it replaced (exam accuracy, paired bootstrap, points)",
        "",
        "| round | from → to | before | after | Δ [95% CI] | worse with 95% confidence |",
        "|---:|---|---:|---:|---:|---|",
        *(
            f"| {p['round']} | {p['from']} → {p['to']} | {p['accuracy_before']:.1%} | "
            f"{p['accuracy_after']:.1%} | {p['difference'] * 100:+.1f} [{p['low'] * 100:+.1f}, "
            f"{p['high'] * 100:+.1f}] | {'yes' if p['worse'] else 'no'} |"
            for p in promotions
        ),
    ]


def _round_story(r: RoundResult) -> list[str]:
    """One round: visitors, training jobs, decisions, rollout and time."""
    lines = [f"### Round {r.round}: {r.model_version} ({r.duration_s / 60:.1f} min)", ""]
    if r.traffic:
        t = r.traffic
        lines.append(
            f"- Visitors: {t.get('asked', 0)} questions, {t.get('rated', 0)} rated "
            f"(mean {t.get('mean_rating') or 0:.2f}), {t.get('ignored', 0)} ignored, "
            f"{t.get('corrections', 0)} corrected by the expert; "
            f"{t.get('canary_visits', 0)} more visits while a canary ran."
        )
    for job in r.jobs:
        lines.append(
            f"- Training job `{job['job_id']}`: {job['state'].lower()}, {job['examples']} new examples "
            "(and earlier batches the serving model has not learned), "
            f"candidate {job.get('candidate_version') or '—'}"
            + (f" ({job['reason']})" if job.get("reason") else "")
        )
    for d in r.decisions:
        verdict = "passed" if d["passed"] else "failed"
        reasons = "; ".join(d.get("reasons", [])) or "—"
        lines.append(
            f"- Decision on {d['version']} vs {d['baseline_version']}: {verdict}, "
            f"action {d['action'] or '—'}: {reasons}"
        )
    if r.rollout:
        lines.append(f"- Rollout: {r.rollout}")
    if r.timings_s:
        lines.append("- Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in r.timings_s.items()))
    lines.append("")
    return lines


def markdown(report: Report, chart_name: str | None = "chart.png") -> str:
    """The report as Markdown: settings, the table, gains over the base model, and each round's story."""
    lines = [*_intro(report), *_gains(report), *_promotions(report)]
    if chart_name:
        lines += ["", f"![accuracy, precision and mean rating over rounds]({chart_name})"]
    lines += ["", "## Rounds", ""]
    for r in report.rounds:
        lines += _round_story(r)
    if report.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in report.notes], ""]
    lines += ["## Settings", "", "```json", json.dumps(report.settings, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def chart(report: Report, path: Path) -> Path:
    """PNG: exam accuracy and precision (with 95% intervals) and the visitors' mean rating, per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in report.rounds]
    labels = [f"{r.round}\n{r.model_version}" for r in report.rounds]
    fig, left = plt.subplots(figsize=(8, 4.8), dpi=120)
    for name, color, marker in (("accuracy", "tab:blue", "o"), ("precision", "tab:green", "s")):
        estimates = [getattr(r.exam, name) for r in report.rounds]
        values = [e.value * 100 for e in estimates]
        left.fill_between(
            rounds,
            [e.low * 100 for e in estimates],
            [e.high * 100 for e in estimates],
            color=color,
            alpha=0.15,
        )
        left.plot(rounds, values, marker=marker, color=color, label=f"exam {name} (95% CI)")
        for x, y in zip(rounds, values, strict=True):
            left.annotate(
                f"{y:.0f}",
                (x, y),
                textcoords="offset points",
                xytext=(0, 7),
                ha="center",
                fontsize=8,
                color=color,
            )
    left.set_ylim(0, 100)
    left.set_ylabel("exam score (%)")
    left.set_xlabel("round (model serving after the round)")
    left.set_xticks(rounds, labels)
    left.grid(axis="y", alpha=0.3)
    right = left.twinx()
    ratings = [
        (r.round, s.mean_rating)
        for r in report.rounds
        if (s := report.ratings_by_version.get(r.model_version)) is not None and s.mean_rating is not None
    ]
    if ratings:
        right.plot(
            [x for x, _ in ratings],
            [y for _, y in ratings],
            marker="^",
            linestyle="--",
            color="tab:orange",
            label="visitors' mean rating",
        )
    right.set_ylim(1, 5)
    right.set_ylabel("mean rating (1-5)")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    names = left.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    left.legend(handles, names, loc="upper left", fontsize=8)
    for r in report.rounds[1:]:
        if r.gate and "failed" in r.gate:
            left.annotate("candidate\nrejected", (r.round, 88), ha="center", fontsize=8, color="tab:red")
    left.set_title(f"Flywheel on {report.dataset}: exam score and visitors' rating by round")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write(report: Report, reports_dir: Path) -> Path:
    """Writes report.json, report.md and chart.png under reports_dir/<timestamp>/; returns the folder."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = reports_dir / stamp
    suffix = 1
    while folder.exists():
        folder = reports_dir / f"{stamp}-{suffix}"
        suffix += 1
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    chart(report, folder / "chart.png")
    (folder / "report.md").write_text(markdown(report))
    return folder
