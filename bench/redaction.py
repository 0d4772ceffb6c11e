"""Redaction benchmark: recall per kind of personal data over the PII corpus, and the CPU cost.

    uv run python bench/redaction.py [--corpus PATH] [--repeat 5] [--json bench/results/redaction.json]

The corpus is the test corpus (`libs/common/tests/data/pii_corpus.jsonl`): each case holds one
kind of personal data (or none) and the values that must not survive. A case is caught when its
`[KIND]` placeholder is in the output and none of its values is; a case without personal data
counts as a false positive when its text changes. Both configurations of `flywheel_common.redaction`
run: the built-in rules alone and with Presidio's recognizers. The cost is the median time to
redact the whole corpus, per 1,000 characters, and the time for one 8,000-character correction
(the feedback service's limit) made of the corpus' texts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "libs" / "common" / "tests" / "data" / "pii_corpus.jsonl"


def caught(case: dict[str, Any], text: str) -> bool:
    if case["kind"] == "NONE":
        return text == case["text"]
    return f"[{case['kind']}]" in text and not any(value in text for value in case["values"])


def measure(corpus: list[dict[str, Any]], presidio: bool, repeat: int) -> dict[str, Any]:
    from flywheel_common.redaction import Redactor

    redactor = Redactor(presidio=presidio)
    total: Counter[str] = Counter()
    hits: Counter[str] = Counter()
    for case in corpus:
        total[case["kind"]] += 1
        hits[case["kind"]] += caught(case, redactor.redact(case["text"]).text)
    chars = sum(len(case["text"]) for case in corpus)
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        for case in corpus:
            redactor.redact(case["text"])
        runs.append(time.perf_counter() - started)
    correction = "\n".join(case["text"] for case in corpus)
    correction = (correction * (8000 // len(correction) + 1))[:8000]
    long_runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        redactor.redact(correction)
        long_runs.append(time.perf_counter() - started)
    negatives = total.pop("NONE", 0)
    false_positives = negatives - hits.pop("NONE", 0)
    return {
        "config": "built-in + presidio" if presidio else "built-in",
        "recall": {kind: {"caught": hits[kind], "total": total[kind]} for kind in sorted(total)},
        "caught": sum(hits.values()),
        "cases": sum(total.values()),
        "false_positives": false_positives,
        "negatives": negatives,
        "ms_per_1000_chars": statistics.median(runs) / chars * 1e6,
        "ms_per_8000_char_correction": statistics.median(long_runs) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    corpus = [json.loads(line) for line in args.corpus.read_text().splitlines() if line.strip()]
    results = [measure(corpus, presidio, args.repeat) for presidio in (False, True)]
    kinds = sorted({kind for r in results for kind in r["recall"]})
    print(f"{'kind':10}" + "".join(f"{r['config']:>22}" for r in results))
    for kind in kinds:
        cells = [r["recall"][kind] for r in results]
        print(f"{kind:10}" + "".join(f"{c['caught']:>17d} / {c['total']:<2d}" for c in cells))
    print(f"{'all':10}" + "".join(f"{r['caught']:>17d} / {r['cases']:<2d}" for r in results))
    print(
        f"{'false pos.':10}" + "".join(f"{r['false_positives']:>17d} / {r['negatives']:<2d}" for r in results)
    )
    print(f"{'ms/1k chr':10}" + "".join(f"{r['ms_per_1000_chars']:>22.2f}" for r in results))
    print(f"{'ms/8k corr':10}" + "".join(f"{r['ms_per_8000_char_correction']:>22.1f}" for r in results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"corpus": str(args.corpus), "results": results}, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
