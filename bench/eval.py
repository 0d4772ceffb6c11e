"""Evaluator benchmark: time to evaluate a golden set of 50 questions on the serving path (questions/s).

    uv run python bench/eval.py [--questions 50] [--concurrency 8] [--max-new-tokens 64] [--json PATH]

Runs the evaluator's own `Evaluator` (the gate's code: AnswerEngine on ONNX Runtime, batched
decoding, scoring with bootstrap intervals) on the bundled dataset's gate split with the prepared
base model, once per combination of `--concurrency` and `--max-new-tokens` (comma-separated lists).
The base model rarely stops before the token limit, so `--max-new-tokens 16` approximates a
fine-tuned candidate that answers in one short sentence. The load average is printed with the
numbers, since every core counts on a 2-core machine, and so is the CPU time the evaluation used
(on an otherwise idle machine the wall time approaches CPU time / cores). Questions whose answer
failed are counted in `errors`; questions/s, answer tokens, latencies and accuracy are over the
answers that did not fail.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from flywheel_common.registry import ModelRegistry
    from flywheel_evaluator.evaluation import Evaluator, compute_metrics, load_golden
    from flywheel_evaluator.settings import EvaluationSettings, GoldenSettings

    golden = load_golden(GoldenSettings(dataset=args.dataset, split=args.split, limit=args.questions))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        registry = ModelRegistry(Path(tmp))
        version = registry.register(args.model_dir, kind="bench").version
        for concurrency in _ints(args.concurrency):
            for max_new_tokens in _ints(args.max_new_tokens):
                settings = EvaluationSettings(
                    concurrency=concurrency, max_batch=concurrency, max_new_tokens=max_new_tokens
                )
                evaluator = Evaluator(registry, golden, settings)
                load_before = os.getloadavg()[0]
                cpu_before = _cpu_seconds()
                started = time.perf_counter()
                result = evaluator.evaluate(version, reuse=False)
                seconds = time.perf_counter() - started
                cpu = _cpu_seconds() - cpu_before
                # A failed answer is not a fast or a wrong one: the rates are over the others.
                answered = [item for item in result.items if not item.error]
                metrics = compute_metrics(
                    answered, resamples=settings.bootstrap_resamples, seed=settings.seed
                )
                tokens = [item.completion_tokens for item in answered]
                rows.append(
                    {
                        "questions": len(result.items),
                        "errors": result.errors,
                        "error_messages": sorted({item.error for item in result.items if item.error}),
                        "concurrency": concurrency,
                        "max_new_tokens": max_new_tokens,
                        "seconds": round(seconds, 1),
                        # CPU time of this process: the cost whatever else shares the cores.
                        "cpu_seconds": round(cpu, 1),
                        "model_load_s": result.settings["model_load_s"],
                        "questions_per_s": round(len(answered) / seconds, 3),
                        "mean_answer_tokens": round(sum(tokens) / len(tokens), 1) if tokens else None,
                        "latency_p50_ms": _rounded(metrics, "latency_p50_ms", 0),
                        "latency_p95_ms": _rounded(metrics, "latency_p95_ms", 0),
                        "accuracy": _rounded(metrics, "accuracy", 3),
                        "load_avg_1m": [round(load_before, 1), round(os.getloadavg()[0], 1)],
                    }
                )
                print_row(rows[-1], header=len(rows) == 1)
                if result.errors:
                    print(
                        f"  {result.errors} of {len(result.items)} answers failed "
                        f"({'; '.join(rows[-1]['error_messages'][:3])})",
                        flush=True,
                    )
    return rows


def _rounded(metrics: dict[str, dict[str, float]], name: str, digits: int) -> float | None:
    """A metric's value rounded, None where no answer gave a basis for it (JSON has no NaN)."""
    value = metrics.get(name, {}).get("value")
    if value is None or math.isnan(value):
        return None
    return round(value, digits) if digits else round(value)


COLUMNS = (
    ("questions", "questions", "{}"),
    ("errors", "errors", "{}"),
    ("concurrency", "conc.", "{}"),
    ("max_new_tokens", "max tok", "{}"),
    ("mean_answer_tokens", "ans tok", "{}"),
    ("seconds", "seconds", "{:.1f}"),
    ("cpu_seconds", "cpu s", "{:.1f}"),
    ("model_load_s", "load s", "{:.1f}"),
    ("questions_per_s", "q/s", "{:.3f}"),
    ("latency_p50_ms", "p50 ms", "{}"),
    ("latency_p95_ms", "p95 ms", "{}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("load_avg_1m", "load avg", "{0[0]}->{0[1]}"),
)


def print_row(row: dict[str, Any], header: bool) -> None:
    cells = ["-" if row[key] is None else fmt.format(row[key]) for key, _, fmt in COLUMNS]
    widths = [max(len(title), len(cell)) for (_, title, _), cell in zip(COLUMNS, cells, strict=True)]
    if header:
        print("  ".join(title.rjust(w) for (_, title, _), w in zip(COLUMNS, widths, strict=True)))
    print("  ".join(cell.rjust(w) for cell, w in zip(cells, widths, strict=True)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", type=Path, default=ROOT / "datasets" / "python-faq")
    parser.add_argument("--split", default="gate")
    parser.add_argument("--questions", type=int, default=50, help="first N questions of the split")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=ROOT / ".cache" / "models" / "smollm2-135m-fp32-cpu" / "onnx",
        help="an ONNX model folder (default: the prepared base model; `flywheel model prepare` makes it)",
    )
    parser.add_argument("--concurrency", default="8", help="comma-separated (the evaluator's default: 8)")
    parser.add_argument("--max-new-tokens", default="64", help="comma-separated (serving default: 64)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    # The retriever's BM25 library logs every index it builds at DEBUG, whatever the root level.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    machine = platform.processor() or platform.machine()
    print(f"{machine}, {os.cpu_count()} CPUs, {args.dataset.name}:{args.split}")
    rows = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"cpus": os.cpu_count(), "machine": platform.machine(), "dataset": str(args.dataset)}
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
