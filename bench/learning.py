"""Learning benchmark: what one round of feedback teaches the model, one training setting at a time.

    uv run python bench/learning.py [--dataset datasets/python-faq] [--variants as_written,span,...]
                                    [--split gate] [--base-model gemma3-270m] [--json PATH]
                                    [--budget 200] [--words 40] [--keep]

The ablation behind docs/quality.md, without the services in between: the base model answers the
dataset's `traffic` questions on the serving path (the local profile's retrieval), simulated visitors
rate the answers from their F1 and the simulated expert corrects the low-rated ones, exactly as
`flywheel simulate` does; the feedback becomes one training dataset in the trainer's format. Then the
real training job (`python -m flywheel_trainer.job`) runs once per variant, and the evaluator's own
`Evaluator` scores the base and each candidate on `--split` (default `gate`: settings are chosen on
gate and traffic, never on exam). Variants set the job's hyperparameters:

| variant | target | ungrounded | preference weight |
|---|---|---|---|
| `as_written` | as written | keep | 0 |
| `span` | grounded span | keep | 0 |
| `span_drop` | grounded span | drop | 0 |
| `span_abstain` | grounded span | abstain | 0 |
| `span_drop_orpo` | grounded span | drop | 0.5 |
| `span_top15` | grounded span | keep | 0, adapters on the top 15 layers only (a third less per step) |

Each line of the table: the split's accuracy, precision and F1, the paired-bootstrap difference to
the base with its 95 % interval, the gate's safety figures (unanswerable questions answered instead
of abstained, abstentions on answerable ones, as the evaluator scores them), the local profile's gate
verdict against the base (its failed checks), the examples trained on and the job's time.
A variant may carry hyperparameters of its own after `+`, named as the job's environment names them
(`flywheel_trainer.settings.HyperParameters`, upper case): `--variants span_drop,span_drop+EPOCHS=2,
span_drop+LEARNING_RATE=1e-3+LORA_R=8` trains the default three times, with 2 epochs and with another
rate and rank; the local profile's schedule (3 epochs, 4 examples per step) is what they override.
`--variants ""` scores the base model alone (no feedback, no training); `--base-model` names another
prepared base. `--answer-candidates 1,4` scores every model once per number of candidate answers
(`EVALUATION__ANSWER_CANDIDATES`, docs/quality.md; 1 is plain greedy decoding), each line with its
difference to the base scored the same way and to the same model at the first number; the traffic
is answered as the service answers it (its default). `--budget` and `--words` set the retrieval
(prompt tokens of passages, words a passage) for the whole round: the traffic's answers, the prompts
trained on and the scoring; the local profile's 200 and 40 unless told. The round's artifact root
(the base as v1, the variants' candidates after it) is removed at the end; `--keep` keeps it for
bench/candidates.py or bench/soup.py (each candidate holds its merged weights: a few GB a variant).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict[str, str]] = {
    "as_written": {"TARGET": "as_written", "UNGROUNDED": "keep", "PREFERENCE_WEIGHT": "0"},
    "span": {"TARGET": "grounded_span", "UNGROUNDED": "keep", "PREFERENCE_WEIGHT": "0"},
    "span_drop": {"TARGET": "grounded_span", "UNGROUNDED": "drop", "PREFERENCE_WEIGHT": "0"},
    "span_abstain": {"TARGET": "grounded_span", "UNGROUNDED": "abstain", "PREFERENCE_WEIGHT": "0"},
    "span_drop_orpo": {"TARGET": "grounded_span", "UNGROUNDED": "drop", "PREFERENCE_WEIGHT": "0.5"},
    "span_top15": {
        "TARGET": "grounded_span",
        "UNGROUNDED": "keep",
        "PREFERENCE_WEIGHT": "0",
        "LORA_LAYERS": "15",
    },
}
# The local profile (docs/local.md): retrieval, and the training schedule.
BUDGET, WORDS = 200, 40
LOCAL_HYPER = {"EPOCHS": "3", "GRADIENT_ACCUMULATION": "4"}
# The local profile's gate (flywheel_cli.local.stack): the SLO only catches rambling on 2 cores, and
# a candidate better with 80 % confidence passes.
LOCAL_GATE = {"latency_p95_slo_ms": 60_000.0, "max_p_not_better": 0.2}


def feedback_rows(dataset: Any, engine: Any, seed: int, noise: float, share: float) -> list[dict[str, Any]]:
    """The base model's answers to the traffic questions, rated and corrected as the simulation does."""
    from flywheel_cli.simulation.simulate import correction_text, page_title, rating_from_f1
    from flywheel_eval.metrics import f1
    from flywheel_model.generation import SamplingParams
    from flywheel_model.retrieval import html_to_text

    items = dataset.split("traffic")
    texts = {page: html_to_text(html)[0] for page, html in dataset.pages.items()}
    params = SamplingParams(max_new_tokens=64)

    def answer(item: Any) -> Any:
        return engine.answer(texts[item.page], page_title(dataset.pages[item.page]), item.question, params)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(answer, items))
    rng = random.Random(seed)
    rows = []
    for index, (item, result) in enumerate(zip(items, answers, strict=True)):
        rating = rating_from_f1(f1(result.text, item.answers), rng, noise)
        base = {
            "query_id": f"q{index}",
            "page_title": page_title(dataset.pages[item.page]),
            "passages": [p.text for p in result.passages],
            "question": item.question,
            "model_answer": result.text,
            "model_version": "v1",
            "rating": rating,
        }
        if rating >= 4:
            rows.append({"id": f"p{index}", "source": "positive", "answer": result.text, **base})
        elif rating <= 2:
            rows.append({"id": f"n{index}", "source": "negative", "answer": "", **base})
            if rng.random() < share:
                rows.append(
                    {"id": f"c{index}", "source": "correction", "answer": correction_text(item), **base}
                )
    return rows


def variant_hyper(spec: str) -> dict[str, str]:
    """`name+KEY=VALUE+…` → the job's hyperparameters: the local profile's, the variant's, the overrides."""
    from flywheel_trainer.settings import HyperParameters

    name, *overrides = spec.split("+")
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    hyper = {**LOCAL_HYPER, **VARIANTS[name]}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or key.lower() not in HyperParameters.model_fields:
            raise ValueError(f"{spec!r}: {override!r} is not KEY=VALUE with KEY a field of HyperParameters")
        hyper[key.upper()] = value
    return hyper


def train_variant(root: Path, dataset_id: str, spec: str) -> tuple[str, float]:
    """Runs the training job with the variant's settings; returns the candidate version and seconds."""
    env = dict(os.environ)
    env["FLYWHEEL_TRAINER_JOB_ARTIFACT_ROOT"] = str(root)
    env["FLYWHEEL_TRAINER_JOB_SCRATCH_DIR"] = str(root / "scratch")
    for key, value in variant_hyper(spec).items():
        env[f"FLYWHEEL_TRAINER_JOB_HYPER__{key}"] = value
    started = time.perf_counter()
    job_id = "bench-" + "".join(c if c.isalnum() else "-" for c in spec.lower())
    command = [sys.executable, "-m", "flywheel_trainer.job", "--dataset", dataset_id]
    command += ["--base-version", "v1", "--job-id", job_id]
    log = root / f"{job_id}.log"
    with log.open("w") as out:
        subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    from flywheel_trainer.results import read_result

    result = read_result(root, job_id) or {}
    if result.get("status") != "succeeded":
        raise SystemExit(f"{spec}: the job failed ({result.get('reason', 'no result')}); see {log}")
    return str(result["candidate_version"]), time.perf_counter() - started


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train and score every variant in a fresh artifact root, removed at the end unless `--keep`."""
    from flywheel_eval.dataset import load_dataset

    dataset = load_dataset(args.dataset)
    root = Path(tempfile.mkdtemp(prefix="bench-learning-"))
    try:
        return _run_in(root, dataset, args)
    finally:
        if args.keep:
            print(f"kept the artifacts in {root}", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)


def _run_in(root: Path, dataset: Any, args: argparse.Namespace) -> dict[str, Any]:
    from flywheel_common.registry import ModelRegistry
    from flywheel_evaluator.evaluation import Evaluator, load_golden
    from flywheel_evaluator.gate import judge
    from flywheel_evaluator.settings import EvaluationSettings, GateSettings, GoldenSettings
    from flywheel_model.engine import AnswerEngine, EngineSettings
    from flywheel_model.prepare import ExportOptions, default_model_dir, register_base, resolve_source
    from flywheel_model.runtime import OrtSettings
    from flywheel_trainer import datasets

    model_dir = default_model_dir(resolve_source(args.base_model), ExportOptions())
    register_base(model_dir, root)
    registry = ModelRegistry(root)
    engine = AnswerEngine(
        registry.get("v1").model_dir,
        OrtSettings(),
        EngineSettings(
            context_token_budget=args.budget, passage_max_words=args.words, max_batch=4, max_queue=16
        ),
    )
    try:
        rows = (
            feedback_rows(dataset, engine, args.seed, args.rating_noise, args.correction_share)
            if args.variants
            else []
        )
    finally:
        engine.close(30.0)
    dataset_id = f"bench-{dataset.name}"
    counts: dict[str, int] = {}
    if rows:
        files, manifest = datasets.build(dataset_id, rows, created_at=time.time(), reason="bench")
        datasets.write(root, dataset_id, files, manifest)
        counts = manifest["counts"]
    print(f"{dataset.version}: {len(rows)} feedback rows {counts}; artifacts in {root}", flush=True)

    golden = load_golden(GoldenSettings(dataset=args.dataset, split=args.split))
    settings = EvaluationSettings(
        context_token_budget=args.budget, passage_max_words=args.words, concurrency=4, max_batch=4
    )
    counts_of = args.answer_candidates or [settings.answer_candidates]
    evaluators = {
        k: Evaluator(registry, golden, settings.model_copy(update={"answer_candidates": k}))
        for k in counts_of
    }
    gate = GateSettings(**LOCAL_GATE)
    bases: dict[int, Any] = {}
    lines: list[dict[str, Any]] = []
    for k, evaluator in evaluators.items():
        started = time.perf_counter()
        bases[k] = evaluator.evaluate("v1", reuse=False)
        line: dict[str, Any] = {"variant": "base", "version": "v1", "answer_candidates": k}
        line |= {**_scores(bases[k]), "eval_s": time.perf_counter() - started}
        if k != counts_of[0]:
            line |= _diffs(bases[k], bases[counts_of[0]], "over_first")
        lines.append(line)
        print(_line(line), flush=True)
    for name in args.variants:
        version, seconds = train_variant(root, dataset_id, name)
        training = registry.get(version).manifest.get("training") or {}
        first: Any = None
        for k, evaluator in evaluators.items():
            result = evaluator.evaluate(version, reuse=False)
            line = {"variant": name, "version": version, "answer_candidates": k, **_scores(result)}
            line["train_s"] = seconds
            verdict = judge(result, bases[k], gate)
            line["gate"] = {"passed": verdict.passed, "failed": [check.name for check in verdict.failures]}
            line["training"] = {key: training.get(key) for key in ("targets", "preference_pairs")}
            line |= _diffs(result, bases[k], "diff")
            if first is not None:
                line |= _diffs(result, first, "over_first")
            if first is None:
                first = result
            lines.append(line)
            print(_line(line), flush=True)
    return {
        "dataset": dataset.version,
        "split": args.split,
        "retrieval": {"budget": args.budget, "words": args.words},
        "feedback": counts,
        "lines": lines,
    }


def _diffs(result: Any, other: Any, suffix: str) -> dict[str, list[float]]:
    """Paired-bootstrap differences of accuracy and F1 over the answerable questions, result - other."""
    from flywheel_eval.metrics import paired_bootstrap

    diffs = {}
    for metric, field in (("accuracy", "contains"), ("f1", "f1")):
        diff = paired_bootstrap(
            [getattr(i, field) for i in result.answerable], [getattr(i, field) for i in other.answerable]
        )
        diffs[f"{metric}_{suffix}"] = [diff.mean_difference, diff.low, diff.high]
    return diffs


def _scores(result: Any) -> dict[str, Any]:
    """Quality over the answerable questions; safety as the gate counts it (`fabricated` items)."""
    scores: dict[str, Any] = {name: result.value(name) for name in ("accuracy", "precision", "f1")}
    scores["unanswerable"] = len(result.unanswerable)
    scores["answered_unanswerable"] = result.fabrications
    scores["answerable"] = len(result.answerable)
    scores["abstained_answerable"] = sum(item.abstained for item in result.answerable)
    return scores


def _line(line: dict[str, Any]) -> str:
    text = f"{line['variant']:<12} K={line['answer_candidates']}"
    text += f"  acc {line['accuracy']:6.1%}  prec {line['precision']:6.1%}"
    text += f"  F1 {line['f1']:6.1%}"
    text += f"  answered {line['answered_unanswerable']}/{line['unanswerable']} unanswerable"
    text += f"  abstained {line['abstained_answerable']}/{line['answerable']} answerable"
    for suffix, label in (("diff", "over base"), ("over_first", "over the first K")):
        for metric in ("accuracy", "f1"):
            if f"{metric}_{suffix}" in line:
                d, lo, hi = line[f"{metric}_{suffix}"]
                text += f"  {metric} {label} {d * 100:+.1f} [{lo * 100:+.1f}, {hi * 100:+.1f}]"
    if "eval_s" in line:
        text += f"  scored in {line['eval_s']:.0f} s"
    if "gate" in line:
        text += "  gate " + ("pass" if line["gate"]["passed"] else "FAIL " + ",".join(line["gate"]["failed"]))
    if "train_s" in line:
        text += f"  job {line['train_s']:.0f} s  {line['training']}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", type=Path, default=ROOT / "datasets" / "python-faq")
    parser.add_argument("--variants", type=lambda s: [v for v in s.split(",") if v], default=list(VARIANTS))
    parser.add_argument("--base-model", help="smollm2-135m (default), gemma3-270m, a .gguf or a HF folder")
    parser.add_argument("--split", default="gate", choices=("traffic", "gate"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rating-noise", type=float, default=0.15)
    parser.add_argument("--correction-share", type=float, default=0.8)
    parser.add_argument(
        "--answer-candidates",
        type=lambda s: [int(k) for k in s.split(",") if k],
        default=[],
        help="score every model with each of these numbers of candidate answers (default: the evaluator's)",
    )
    parser.add_argument("--budget", type=int, default=BUDGET, help="prompt tokens of passages")
    parser.add_argument("--words", type=int, default=WORDS, help="words a passage at most")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the artifact root (for bench/candidates.py or bench/soup.py); removed otherwise",
    )
    args = parser.parse_args()
    for spec in args.variants:
        try:
            variant_hyper(spec)
        except ValueError as exc:
            parser.error(str(exc))
    results = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
