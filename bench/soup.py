"""Weight-averaging benchmark: is the mean of several trained models better than the models?

    uv run python bench/soup.py --registry DIR --soups v2+v3+v4,v1+v4 [--dataset DIR] [--split gate]
                                [--budget 200] [--words 40] [--json bench/results/soup.json]

`--registry` is the artifact root `bench/learning.py --keep` kept (v1 the base, v2 onward its variants):
for instance `--variants span_drop,span_drop+SEED=1235,span_drop+SEED=1236` trains the default job
three times on one round's feedback, with three seeds. Each soup (versions joined by `+`) is the
mean of those versions' merged weights (one base, so the base plus the mean of their deltas: a
"model soup" of seeds, or with the base among them a fine-tune moved part of the way), exported the
way the training job exports a candidate and registered as a new version. The base, every member
and every soup are scored by the evaluator's own `Evaluator` (the local profile's retrieval unless
told); each soup's line gives its accuracy, precision and F1 and the paired-bootstrap difference of
accuracy and F1 to each member and to the members' mean. Choose on `traffic` or `gate`, not on
`exam` (docs/quality.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The local profile's retrieval (docs/local.md).
BUDGET, WORDS = 200, 40


def average(merged_dirs: Sequence[Path], out_dir: Path) -> Path:
    """The mean of Hugging Face folders' weights, with the first folder's other files."""
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    for shard in sorted(p.name for p in merged_dirs[0].glob("*.safetensors")):
        total = load_file(merged_dirs[0] / shard)
        for other in merged_dirs[1:]:
            for key, value in load_file(other / shard).items():
                total[key] += value
        mean = {key: value / len(merged_dirs) for key, value in total.items()}
        save_file(mean, out_dir / shard, metadata={"format": "pt"})
    for path in merged_dirs[0].iterdir():
        if path.is_file() and not path.name.endswith(".safetensors"):
            shutil.copyfile(path, out_dir / path.name)
    return out_dir


def build(registry: Any, members: Sequence[str], scratch: Path) -> str:
    """Averages the members, exports the mean as the job exports a candidate (its exporter's cache in
    `scratch`, where `bench/learning.py`'s jobs keep it); the new version."""
    from flywheel_trainer.job.run import export_plan_of

    folder = scratch / f"soup-{'-'.join(members)}"
    hf_dir = average([registry.get(v).hf_dir for v in members], folder / "hf")
    plan = export_plan_of(registry.get(members[0]))
    onnx_dir = plan.export(hf_dir, folder / "onnx", scratch / "hf-export")
    plan.switch_to_served(onnx_dir)
    metadata = {"export": plan.record(), "soup": list(members)}
    return str(registry.register(onnx_dir, kind="candidate", hf_dir=hf_dir, metadata=metadata).version)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from flywheel_common.registry import ModelRegistry
    from flywheel_eval.metrics import paired_bootstrap
    from flywheel_evaluator.evaluation import Evaluator, load_golden
    from flywheel_evaluator.settings import EvaluationSettings, GoldenSettings

    registry = ModelRegistry(args.registry)
    golden = load_golden(GoldenSettings(dataset=args.dataset, split=args.split))
    settings = EvaluationSettings(
        context_token_budget=args.budget, passage_max_words=args.words, concurrency=4, max_batch=4
    )
    evaluator = Evaluator(registry, golden, settings)
    scored: dict[str, Any] = {}

    def score(version: str) -> Any:
        if version not in scored:
            scored[version] = evaluator.evaluate(version, reuse=False)
        return scored[version]

    def diff(result: Any, others: Sequence[Any], field: str) -> list[float]:
        ours = [getattr(item, field) for item in result.answerable]
        theirs = [
            sum(getattr(o.answerable[i], field) for o in others) / len(others) for i in range(len(ours))
        ]
        d = paired_bootstrap(ours, theirs)
        return [d.mean_difference, d.low, d.high]

    rows = []
    for soup in args.soups:
        members = soup.split("+")
        started = time.perf_counter()
        version = build(registry, members, args.registry / "scratch")
        built_s = time.perf_counter() - started
        result = score(version)
        row: dict[str, Any] = {"soup": soup, "version": version, "built_s": built_s}
        row |= {name: result.value(name) for name in ("accuracy", "precision", "f1")}
        row["members"] = {
            v: {name: score(v).value(name) for name in ("accuracy", "precision", "f1")} for v in members
        }
        others = {v: [score(v)] for v in members} | {"mean": [score(v) for v in members]}
        row["over"] = {
            name: {"accuracy": diff(result, group, "contains"), "f1": diff(result, group, "f1")}
            for name, group in others.items()
        }
        rows.append(row)
        print(_lines(row), flush=True)
    return rows


def _lines(row: dict[str, Any]) -> str:
    text = (
        f"{row['soup']:<12} {row['version']:<5} acc {row['accuracy']:6.1%}  prec {row['precision']:6.1%}"
        f"  F1 {row['f1']:6.1%}  built in {row['built_s']:.0f} s"
    )
    for name, d in row["over"].items():
        member = row["members"].get(name)
        own = f" ({member['accuracy']:.1%}, F1 {member['f1']:.1%})" if member else ""
        acc, f1 = d["accuracy"], d["f1"]
        text += (
            f"\n  over {name}{own}: accuracy {acc[0] * 100:+.1f} [{acc[1] * 100:+.1f}, {acc[2] * 100:+.1f}]"
            f"  F1 {f1[0] * 100:+.1f} [{f1[1] * 100:+.1f}, {f1[2] * 100:+.1f}]"
        )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--registry", type=Path, required=True, help="an artifact root")
    parser.add_argument("--soups", required=True, help="versions joined by +, comma-separated")
    parser.add_argument("--dataset", type=Path, default=ROOT / "datasets" / "python-faq")
    parser.add_argument("--split", default="gate", choices=("traffic", "gate"))
    parser.add_argument("--budget", type=int, default=BUDGET, help="prompt tokens of passages")
    parser.add_argument("--words", type=int, default=WORDS, help="words per passage at most")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.soups = [s for s in args.soups.split(",") if s]
    if any(len(s.split("+")) < 2 for s in args.soups):
        parser.error("a soup is two versions or more, joined by +")
    rows = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"dataset": str(args.dataset), "split": args.split, "rows": rows}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
