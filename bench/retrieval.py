"""Retrieval benchmark: how often the passages a prompt gets hold an acceptable answer.

    uv run python bench/retrieval.py [--dataset DIR] [--splits traffic,gate] [--words 40,80]
                                     [--budgets 200,400] [--json bench/results/retrieval.json]

For each passage size (`passage_max_words`) and prompt budget (`context_token_budget`) it runs
the serving retriever (`flywheel_model.retrieval`, the prepared model's tokenizer) on every
answerable question of each split and counts the questions whose selected passages contain an
acceptable answer on token boundaries: the most a model could get right from that context. No
model is run. Compare sizes on the splits the system sees (`traffic`, `gate`), not on `exam`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def coverage(dataset: Path, splits: list[str], words: list[int], budgets: list[int]) -> list[dict[str, Any]]:
    from flywheel_eval.dataset import load_dataset
    from flywheel_eval.metrics import is_token_span
    from flywheel_model.prepare import ExportOptions, ensure_prepared
    from flywheel_model.prompt import PromptEncoder
    from flywheel_model.retrieval import Retriever, html_to_text

    data = load_dataset(dataset)
    encoder = PromptEncoder(ensure_prepared(None, ExportOptions(), None, force=False) / "onnx")
    pages = {name: html_to_text(html) for name, html in data.pages.items()}
    rows = []
    for split in splits:
        items = [item for item in data.split(split) if item.answers]
        for max_words in words:
            retriever = Retriever(encoder.count_tokens, max_words=max_words)
            for budget in budgets:
                held = 0
                for item in items:
                    text, _ = pages[item.page]
                    passages = retriever.select(text, item.question, token_budget=budget)
                    context = "\n".join(p.text for p in passages)
                    held += any(is_token_span(answer, context) for answer in item.answers)
                rows.append(
                    {
                        "split": split,
                        "questions": len(items),
                        "passage_max_words": max_words,
                        "context_token_budget": budget,
                        "answer_in_context": held / len(items) if items else 0.0,
                    }
                )
    return rows


SPLITS = ("traffic", "gate")


def _splits(text: str) -> list[str]:
    splits = [s for s in text.split(",") if s]
    if not splits or any(s not in SPLITS for s in splits):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated splits of {', '.join(SPLITS)}")
    return splits


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", type=Path, default=ROOT / "datasets" / "python-faq")
    # Passage sizes are chosen here: never on `exam`, the split kept for the final comparison.
    parser.add_argument(
        "--splits",
        type=_splits,
        default="traffic,gate",
        help="comma-separated, of traffic and gate (not exam: settings are chosen on this bench)",
    )
    parser.add_argument("--words", default="40,80", help="passage sizes in words, comma-separated")
    parser.add_argument("--budgets", default="200,400", help="prompt budgets in tokens, comma-separated")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    rows = coverage(
        args.dataset,
        args.splits,
        [int(w) for w in args.words.split(",")],
        [int(b) for b in args.budgets.split(",")],
    )
    print(f"{'split':8} {'questions':>9} {'words':>6} {'budget':>7} {'answer in context':>18}")
    for r in rows:
        print(
            f"{r['split']:8} {r['questions']:9d} {r['passage_max_words']:6d} "
            f"{r['context_token_budget']:7d} {r['answer_in_context']:18.0%}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"dataset": str(args.dataset), "rows": rows}, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
