"""Training benchmark: seconds per optimizer step and examples/s of LoRA on CPU (QLoRA on CUDA, when
there is a GPU), and the end-to-end time from "batch cut" to "candidate registered" for a batch.

The examples are real prompts: questions of a dataset's traffic split with the passages retrieval
picks from their page (the serving prompt), answered with an acceptable answer.

    uv run python bench/train.py                      # both parts, 32-example batch
    uv run python bench/train.py --skip-e2e --steps 4 # step timing only
    uv run python bench/train.py --json var/bench/train.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def realistic_examples(dataset_dir: Path, model_dir: Path, n: int) -> list[dict[str, Any]]:
    """Up to n answerable traffic questions with their retrieved passages, as dataset examples."""
    from flywheel_eval.dataset import load_dataset
    from flywheel_model.engine import EngineSettings
    from flywheel_model.prompt import PromptEncoder
    from flywheel_model.retrieval import Retriever, html_to_text

    dataset = load_dataset(dataset_dir)
    encoder = PromptEncoder(model_dir)
    engine = EngineSettings()
    retriever = Retriever(encoder.count_tokens, max_words=engine.passage_max_words)
    pages = {pid: html_to_text(html) for pid, html in dataset.pages.items()}
    examples = []
    for item in [i for i in dataset.split("traffic") if i.answerable][:n]:
        text, title = pages[item.page]
        passages = retriever.select(text, item.question, token_budget=engine.context_token_budget)
        examples.append(
            {
                "id": f"bench-{item.id}",
                "source": "correction",
                "query_id": f"q-{item.id}",
                "page_title": title,
                "passages": [p.text for p in passages],
                "question": item.question,
                "answer": item.answers[0],
                "model_answer": "",
                "model_version": "v1",
            }
        )
    return examples


def bench_steps(prepared: Path, examples: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Times `steps` optimizer steps with the job's default hyper-parameters."""
    import torch

    from flywheel_model.prompt import PromptEncoder
    from flywheel_model.runtime import DecoderSpec
    from flywheel_trainer.job import data, train
    from flywheel_trainer.job.run import resolve_device
    from flywheel_trainer.settings import JobSettings

    settings = JobSettings()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device, quantization = resolve_device(settings)
    hyper = settings.hyper.model_copy(update={"max_steps": steps})
    encoder = PromptEncoder(prepared / "onnx")
    eos = encoder.stop_token_ids(DecoderSpec.load(prepared / "onnx").eos_token_ids)
    tokenized, _ = data.tokenize(examples, encoder, eos, hyper.max_seq_tokens)
    started = time.perf_counter()
    model = train.load_for_training(prepared / "hf", device, quantization, hyper)
    load_s = time.perf_counter() - started
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = train.train(model, tokenized, hyper, device=device, pad_id=eos[0])
    lengths = [len(t.input_ids) for t in tokenized]
    return {
        "device": device,
        "quantization": quantization,
        "threads": torch.get_num_threads(),
        "micro_batch_size": hyper.micro_batch_size,
        "gradient_accumulation": hyper.gradient_accumulation,
        "mean_tokens_per_example": round(sum(lengths) / len(lengths), 1),
        "load_s": round(load_s, 1),
        "steps": result.steps,
        "seconds_per_step": round(result.seconds_per_step, 2),
        "examples_per_s": round(result.examples_seen / result.seconds, 3),
        "tokens_per_s": round(result.total_tokens / result.seconds, 1),
        "loss_curve": result.loss_curve,
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None,
    }


async def bench_end_to_end(prepared: Path, examples: list[dict[str, Any]], workdir: Path) -> dict[str, Any]:
    """Cuts one batch of the examples through the real trainer and a local job; times cut -> registered."""
    from flywheel_common.registry import ModelRegistry
    from flywheel_model.prepare import read_manifest
    from flywheel_proto.flywheel.events.v1 import events_pb2
    from flywheel_trainer.launchers import LocalJobLauncher
    from flywheel_trainer.policy import ExamplePolicy, FeedbackSignal
    from flywheel_trainer.settings import BatchSettings, TrainerSettings
    from flywheel_trainer.store import JoinStore
    from flywheel_trainer.trainer import Trainer

    settings = TrainerSettings(
        artifact_root=workdir / "artifacts",
        data_dir=workdir / "trainer",
        batch=BatchSettings(max_examples=len(examples)),
    )
    registry = ModelRegistry(settings.artifact_root)
    base = registry.register(
        prepared / "onnx", kind="base", hf_dir=prepared / "hf", metadata={"prepared": read_manifest(prepared)}
    )
    registry.set_production(base.version)
    store = JoinStore(settings.data_dir / "trainer.sqlite3", ExamplePolicy(settings.policy))
    interactions = [
        events_pb2.Interaction(
            query_id=e["query_id"],
            page_title=e["page_title"],
            question=e["question"],
            answer="The page does not say.",
            passages=e["passages"],
            model_version=base.version,
        )
        for e in examples
    ]
    corrections = [
        FeedbackSignal(
            f"fb-{e['query_id']}",
            e["query_id"],
            events_pb2.FEEDBACK_KIND_CORRECTION,
            0,
            e["answer"],
            events_pb2.REVIEWER_ROLE_EXPERT,
        )
        for e in examples
    ]
    store.ingest(interactions, corrections)
    launcher = LocalJobLauncher(settings)
    trainer = Trainer(settings, store, launcher, registry, None)
    started = time.perf_counter()
    cut = await trainer.cut("manual")
    assert cut is not None
    while True:
        await trainer.tick()
        job = store.job(cut.job_id)
        assert job is not None
        if job.state in ("succeeded", "failed"):
            break
        await asyncio.sleep(0.5)
    elapsed = time.perf_counter() - started
    if job.state != "succeeded":
        log = launcher.log_path(job.job_id).read_text()[-3000:]
        raise RuntimeError(f"the job failed: {job.reason}\n{log}")
    manifest = registry.get(job.candidate_version).manifest
    training = manifest["training"]
    store.close()
    return {
        "examples": cut.examples,
        "cut_to_registered_s": round(elapsed, 1),
        "job_steps": training["steps"],
        "job_seconds_per_step": training["seconds_per_step"],
        "job_timings_s": training["timings"],
        "epoch_losses": training["epoch_losses"],
        "candidate": job.candidate_version,
    }


def table(rows: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default=str(ROOT / "datasets" / "python-faq"), help="dataset folder")
    parser.add_argument("--examples", type=int, default=32, help="batch size of the end-to-end run")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps timed")
    parser.add_argument("--skip-steps", action="store_true", help="skip the step timing")
    parser.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--base-model", help="smollm2-135m (default), gemma3-270m, a .gguf or a HF folder")
    parser.add_argument("--json", help="also write the results as JSON here")
    args = parser.parse_args()
    # As the job does: OpenMP threads sleep rather than spin while waiting (set before torch loads).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.threads:
        os.environ["FLYWHEEL_TRAINER_JOB_THREADS"] = str(args.threads)

    sys.path.insert(0, str(ROOT / "cli" / "src"))
    from flywheel_model.prepare import ExportOptions, ensure_prepared, resolve_source

    prepared = ensure_prepared(resolve_source(args.base_model), ExportOptions(), None, force=False)
    examples = realistic_examples(Path(args.dataset), prepared / "onnx", args.examples)
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
        "examples": len(examples),
    }
    if not args.skip_steps:
        print(f"timing {args.steps} optimizer steps ...", flush=True)
        results["steps"] = bench_steps(prepared, examples, args.steps)
    if not args.skip_e2e:
        print(f"end to end: a {len(examples)}-example batch through a local job ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="flywheel-bench-train-") as tmp:
            results["end_to_end"] = asyncio.run(bench_end_to_end(prepared, examples, Path(tmp)))
    results["machine"]["load_avg_after"] = os.getloadavg()

    rows: list[tuple[str, Any]] = [("examples (real prompts)", len(examples))]
    if "steps" in results:
        s = results["steps"]
        label = "QLoRA (NF4, bf16)" if s["quantization"] == "nf4" else "LoRA (fp32)"
        rows += [
            ("mode", f"{label} on {s['device']}, {s['threads']} threads"),
            ("effective batch", f"{s['micro_batch_size']} x {s['gradient_accumulation']} accumulation"),
            ("mean tokens / example", s["mean_tokens_per_example"]),
            ("seconds / optimizer step", s["seconds_per_step"]),
            ("examples / s", s["examples_per_s"]),
            ("tokens / s", s["tokens_per_s"]),
        ]
        if s["peak_gpu_mib"] is not None:
            rows.append(("peak GPU memory (MiB)", s["peak_gpu_mib"]))
    if "end_to_end" in results:
        e = results["end_to_end"]
        phases = ", ".join(f"{k.removesuffix('_s')} {v}" for k, v in e["job_timings_s"].items())
        rows += [
            ("batch cut -> candidate registered (s)", e["cut_to_registered_s"]),
            ("  job steps, s/step", f"{e['job_steps']}, {e['job_seconds_per_step']}"),
            ("  job phases (s)", phases),
            ("  epoch losses", e["epoch_losses"]),
        ]
    rows.append(("load average before / after", f"{results['machine']['load_avg'][0]:.1f} / "
                 f"{results['machine']['load_avg_after'][0]:.1f}"))  # fmt: skip
    print(table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
