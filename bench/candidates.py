"""Candidate answers benchmark: how often the greedy answer, the chosen one and the best of the
candidates are right, for registered model versions on a golden split.

    uv run python bench/candidates.py --registry DIR [--dataset DIR] [--split gate]
                                      [--versions v1,v2] [--counts 4,8] [--budget 200] [--words 40]
                                      [--json bench/results/candidates.json]

`--registry` is an artifact root holding the versions: `var/artifacts` after `flywheel up`, or the
folder `bench/learning.py --keep` keeps (v1 the base, v2 onward its variants). Each version is scored by
the evaluator's own `Evaluator` (the local profile's retrieval unless told) once per count of
candidates (`answer_candidates`), and every question's candidates are kept as the engine hands them
to `flywheel_model.candidates.choose`. The table counts the answerable questions an answer is
right for (an acceptable answer in it, the evaluator's accuracy): the first candidate (greedy
decoding), the chosen one (what the service answers), and any of them (the most a rule for
choosing could get). A question with one finished candidate counts its answer in all three.
Choose rules on `traffic` or `gate`, not on `exam` (docs/quality.md).
"""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The local profile's retrieval (docs/local.md).
BUDGET, WORDS = 200, 40


def score(args: argparse.Namespace) -> list[dict[str, Any]]:
    from flywheel_common.registry import ModelRegistry
    from flywheel_eval.metrics import contains
    from flywheel_evaluator.evaluation import Evaluator, load_golden
    from flywheel_evaluator.settings import EvaluationSettings, GoldenSettings
    from flywheel_model import candidates

    golden = load_golden(GoldenSettings(dataset=args.dataset, split=args.split))
    items = {item.id: item for item in golden.items}
    if len({item.question for item in golden.items}) < len(items):
        raise SystemExit(f"{args.split} repeats a question: candidates are kept by question")
    registry = ModelRegistry(args.registry)
    seen: dict[str, list[str]] = {}
    lock = threading.Lock()
    choose = candidates.choose

    def recording(question: str, passages: candidates.Passages, answers: Sequence[str]) -> int:
        with lock:
            seen[question] = list(answers)
        return choose(question, passages, answers)

    rows = []
    candidates.choose = recording  # the engine calls it through the module
    try:
        for count in args.counts:
            settings = EvaluationSettings(
                context_token_budget=args.budget,
                passage_max_words=args.words,
                answer_candidates=count,
                max_batch=max(EvaluationSettings().max_batch, count),
            )
            evaluator = Evaluator(registry, golden, settings)
            for version in args.versions:
                seen.clear()
                result = evaluator.evaluate(version, reuse=False)
                greedy = chosen = best = several = 0
                for item in result.answerable:
                    options = seen.get(items[item.id].question) or [item.prediction]
                    several += len(options) > 1
                    right = [contains(option, items[item.id].answers) for option in options]
                    greedy += int(right[0])
                    chosen += int(item.contains)
                    best += int(max(right))
                rows.append(
                    {
                        "version": version,
                        "answer_candidates": count,
                        "answerable": len(result.answerable),
                        "with_several": several,
                        "greedy": greedy,
                        "chosen": chosen,
                        "best": best,
                        "precision": result.value("precision"),
                        "f1": result.value("f1"),
                        "duration_s": result.duration_s,
                    }
                )
                print(_line(rows[-1]), flush=True)
    finally:
        candidates.choose = choose
    return rows


def _line(row: dict[str, Any]) -> str:
    n = row["answerable"] or 1
    return (
        f"{row['version']:8} {row['answer_candidates']:10d} {row['answerable']:10d} "
        f"{row['with_several']:8d} {row['greedy']:5d} {row['greedy'] / n:5.1%} "
        f"{row['chosen']:5d} {row['chosen'] / n:5.1%} {row['best']:5d} {row['best'] / n:5.1%} "
        f"{row['f1']:6.1%} {row['duration_s']:6.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--registry", type=Path, required=True, help="an artifact root")
    parser.add_argument("--dataset", type=Path, default=ROOT / "datasets" / "python-faq")
    # Rules are chosen here: never on `exam`, the split kept for the final comparison.
    parser.add_argument("--split", default="gate", choices=("traffic", "gate"))
    parser.add_argument("--versions", default="v1,v2", help="comma-separated")
    parser.add_argument("--counts", default="4", help="candidates per question, comma-separated")
    parser.add_argument("--budget", type=int, default=BUDGET, help="prompt tokens of passages")
    parser.add_argument("--words", type=int, default=WORDS, help="words per passage at most")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.versions = args.versions.split(",")
    args.counts = [int(c) for c in args.counts.split(",")]
    print(
        f"{'version':8} {'candidates':>10} {'answerable':>10} {'several':>8} "
        f"{'greedy right':>11} {'chosen right':>11} {'any right':>11} {'F1':>6} {'s':>6}"
    )
    rows = score(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"dataset": str(args.dataset), "split": args.split, "rows": rows}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
