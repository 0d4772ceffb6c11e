"""One training job, start to finish: dataset + base version -> adapter -> merged model -> ONNX ->
checked -> registered candidate with lineage -> result file (the trainer announces the candidate).

Nothing reaches the registry until every step before it succeeded, and registration itself is
all or nothing, so a failed job leaves no half-registered version.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from flywheel_common.files import file_sha256, freeze_tree, tree_bytes
from flywheel_common.registry import ModelRegistry, ModelVersion, now_iso
from flywheel_trainer import datasets
from flywheel_trainer.results import registered_candidate, write_result
from flywheel_trainer.settings import JobSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobArgs:
    """What to train: a dataset (id or folder), the version to start from, and the job's id."""

    dataset: str
    base_version: str
    job_id: str


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("torch", "transformers", "peft", "bitsandbytes", "onnxruntime", "onnxruntime-genai"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "absent"
    return out


def resolve_device(settings: JobSettings) -> tuple[str, str]:
    """(device, quantization): auto picks CUDA + NF4 QLoRA where a GPU is, else CPU + fp32 LoRA."""
    import torch

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda asked for, but CUDA is not available")
    quantization = settings.quantization
    if quantization == "auto":
        quantization = "nf4" if device == "cuda" else "none"
    return device, quantization


@dataclass(frozen=True)
class ExportPlan:
    """How a candidate is exported: its parent's options, and the GGUF its blocks come from."""

    options: Any  # flywheel_model.prepare.ExportOptions
    gguf: dict[str, str] | None = None  # {"path", "sha256"} of the lineage's GGUF, for gguf
    note: str = ""  # why the plan differs from the parent's export, if it does

    @property
    def verified_options(self) -> Any:
        """What the export is built and verified in: `gguf_a8` is `gguf` (fp32 activations, exact)
        until verified, then switched to 8-bit activations."""
        from flywheel_model.prepare import ExportOptions

        if self.options.precision == "gguf_a8":
            return ExportOptions(precision="gguf", provider=self.options.provider)
        return self.options

    def export(self, hf_dir: Path, out_dir: Path, cache_dir: Path) -> Path:
        """Exports merged weights to ONNX in the options they are verified in."""
        from flywheel_model.prepare import export_onnx

        gguf = Path(self.gguf["path"]) if self.gguf else None
        return export_onnx(hf_dir, out_dir, self.verified_options, cache_dir=cache_dir, gguf=gguf)

    def switch_to_served(self, onnx_dir: Path) -> None:
        """Sets a verified export's accuracy level to the one it is served at (`gguf_a8`)."""
        if self.options.accuracy_level != self.verified_options.accuracy_level:
            from flywheel_model.ggml_blocks import set_accuracy_level

            set_accuracy_level(onnx_dir, self.options.accuracy_level)

    def record(self) -> dict[str, Any]:
        """The candidate manifest's `export` entry (its own candidates read it back)."""
        record: dict[str, Any] = {"precision": self.options.precision, "provider": self.options.provider}
        if self.gguf:
            record["gguf"] = self.gguf
        if self.note:
            record["note"] = self.note
        return record


def export_plan_of(parent: ModelVersion) -> ExportPlan:
    """The parent's ONNX export, so every version in a lineage is served the same way.

    A parent stored as a GGUF's blocks hands its candidates the same GGUF: the weights a fine-tune
    left alone (the embedding and output matrix, any layer it did not adapt) are stored as those
    blocks again, the adapted ones stay fp32 (merging moves them off the grid). Both are exact, as
    the verify step below requires; a `gguf_a8` candidate is verified with fp32 activations and
    switched to 8-bit ones afterwards. Where the GGUF is not at its recorded path with its recorded
    digest (a job on another machine), the candidate is exported in fp32 and the manifest says so.
    An fp32 lineage needs no GGUF: its export rescores the output projection whatever its source.
    """
    from flywheel_model.prepare import ExportOptions

    prepared = parent.manifest.get("prepared", {})
    export = parent.manifest.get("export") or prepared.get("export") or {}
    options = ExportOptions(precision=export.get("precision", "fp32"), provider=export.get("provider", "cpu"))
    if not options.gguf_blocks:
        return ExportPlan(options)
    source = prepared.get("source", {})
    gguf = export.get("gguf") or (
        {"path": source["path"], "sha256": source["sha256"]} if source.get("kind") == "gguf" else None
    )
    if gguf is None or not Path(gguf["path"]).is_file() or file_sha256(Path(gguf["path"])) != gguf["sha256"]:
        note = f"the parent's GGUF is not here ({gguf['path'] if gguf else 'none recorded'}): fp32"
        log.warning("exporting in fp32: %s", note)
        return ExportPlan(ExportOptions(precision="fp32", provider=options.provider), note=note)
    return ExportPlan(options, gguf)


def _dir_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            digest.update(f"{p.relative_to(path)}:{file_sha256(p)}\n".encode())
    return digest.hexdigest()


class _Laps:
    """Seconds spent in each named step, for the result and the registry."""

    def __init__(self) -> None:
        self.started = self._mark = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._mark, 2)
        self._mark = now

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 1)


@dataclass
class _Inputs:
    """What one job trains on, with where each part came from."""

    parent: ModelVersion
    dataset: datasets.Dataset
    current: list[Any]
    replay: list[Any]
    replay_from: list[str]
    trained_on: list[str]
    examples: list[Any]
    skipped: list[str]
    pad_id: int
    device: str
    quantization: str
    # How the examples' targets were shaped (job/targets.py).
    targets: dict[str, int]

    @property
    def carried(self) -> int:
        return len(self.current) - len(self.dataset.examples)


def _gather(settings: JobSettings, args: JobArgs, registry: ModelRegistry) -> _Inputs:
    """The parent version, this batch with the earlier ones carried over and replayed, tokenized."""
    from flywheel_model.prompt import PromptEncoder
    from flywheel_model.runtime import DecoderSpec
    from flywheel_trainer.job import data, targets

    parent = registry.get(args.base_version)
    if not (parent.hf_dir / "config.json").is_file():
        raise RuntimeError(f"base version {parent.version} has no Hugging Face weights to train from")
    dataset = datasets.load(settings.artifact_root, args.dataset)
    earlier = datasets.earlier(settings.artifact_root, dataset.dataset_id)
    hyper = settings.hyper
    learned = data.learned_datasets(registry, parent.version)
    current, trained_on = data.carry_over(
        dataset,
        # A dataset replaced after a forget is learned when the version it replaces was.
        [d for d in earlier if not learned & {d.dataset_id, *d.manifest.get("replaces", [])}],
        max_examples=hyper.carry_over_max_examples,
    )
    replay, replay_from = data.select_replay(
        current,
        [d for d in earlier if d.dataset_id not in trained_on],
        fraction=hyper.replay_fraction,
        max_examples=hyper.replay_max_examples,
        seed=hyper.seed,
    )
    device, quantization = resolve_device(settings)
    log.info(
        "job %s: %d examples (%d carried over from %d earlier batches) + %d replayed, base %s, %s/%s",
        args.job_id, len(current), len(current) - len(dataset.examples), len(trained_on) - 1,
        len(replay), parent.version, device, quantization,
    )  # fmt: skip

    # The serving tokenizer and prompt (the base version's ONNX folder), and its stop tokens.
    encoder = PromptEncoder(parent.model_dir)
    eos_ids = encoder.stop_token_ids(DecoderSpec.load(parent.model_dir).eos_token_ids)
    shaped, target_stats = targets.shape_targets([*current, *replay], hyper.target, hyper.ungrounded)
    if not shaped:
        raise RuntimeError(
            f"no example left to train on: all {target_stats.dropped} were answers the passages do not "
            f"ground, left out under hyper.ungrounded={hyper.ungrounded}"
        )
    examples, skipped = data.tokenize(
        shaped, encoder, eos_ids, hyper.max_seq_tokens, preferences=hyper.preference_weight > 0
    )
    if not examples:
        raise RuntimeError(f"no example fits in {hyper.max_seq_tokens} tokens ({len(skipped)} skipped)")
    pad_id = encoder.tokenizer.pad_token_id if encoder.tokenizer.pad_token_id is not None else eos_ids[0]
    return _Inputs(
        parent,
        dataset,
        current,
        replay,
        replay_from,
        trained_on,
        examples,
        skipped,
        pad_id,
        device,
        quantization,
        target_stats.as_dict(),
    )


def _check_space(settings: JobSettings, parent: ModelVersion) -> None:
    """Fails before training when the candidate would not fit, rather than after it: its merged
    weights and ONNX export take about the parent's size in scratch, and again in the artifact
    store (the registry copies what it cannot hard-link)."""
    size = tree_bytes(parent.hf_dir) + tree_bytes(parent.model_dir)
    needs: dict[int, tuple[Path, int]] = {}
    for path in (settings.scratch_dir, settings.artifact_root):
        path.mkdir(parents=True, exist_ok=True)
        device = path.stat().st_dev
        where, need = needs.get(device, (path, 0))
        needs[device] = (where, need + size)
    for where, need in needs.values():
        free = shutil.disk_usage(where).free
        if free < need:
            raise RuntimeError(
                f"not enough disk for the candidate: {where} has {free / 2**30:.1f} GiB free, the job "
                f"needs about {need / 2**30:.1f} GiB (its weights and ONNX export, in scratch and in "
                "the artifact store); free some, or prune old versions (docs/evaluator.md, Retention)"
            )


def _train_and_merge(
    settings: JobSettings, inputs: _Inputs, scratch: Path, laps: _Laps
) -> tuple[Any, str, Path]:
    """Trains a LoRA adapter and merges it into the parent's weights: (training, adapter hash, merged)."""
    import torch

    from flywheel_trainer.job import train

    model = train.load_for_training(inputs.parent.hf_dir, inputs.device, inputs.quantization, settings.hyper)
    laps.lap("load_s")

    def on_step(step: int, total: int, loss: float) -> None:
        log.info("step %d/%d loss %.4f", step, total, loss, extra={"step": step, "loss": round(loss, 5)})

    trained = train.train(
        model, inputs.examples, settings.hyper, device=inputs.device, pad_id=inputs.pad_id, on_step=on_step
    )
    laps.lap("train_s")
    adapter_dir = scratch / "adapter"
    model.save_pretrained(adapter_dir)
    adapter_sha = _dir_sha256(adapter_dir)
    del model
    if inputs.device == "cuda":
        torch.cuda.empty_cache()
    merged_dir = train.merge(inputs.parent.hf_dir, adapter_dir, scratch / "hf")
    laps.lap("merge_s")
    return trained, adapter_sha, merged_dir


def _export_and_verify(
    settings: JobSettings, inputs: _Inputs, merged_dir: Path, scratch: Path, laps: _Laps
) -> tuple[ExportPlan, Path, Any]:
    """Exports the merged model to ONNX and checks its greedy answers match PyTorch's."""
    import torch
    from transformers import AutoModelForCausalLM

    from flywheel_trainer.job import data, verify

    plan = export_plan_of(inputs.parent)
    cache_dir = settings.export_cache_dir or settings.scratch_dir / "hf-export"
    onnx_dir = plan.export(merged_dir, scratch / "onnx", cache_dir)
    laps.lap("export_s")

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    probe = inputs.dataset.examples[: settings.verify.prompts]
    checked = verify.compare(
        merged,
        onnx_dir,
        [data.messages_of(e) for e in probe],
        max_new_tokens=settings.verify.max_new_tokens,
        tie_tolerance=settings.verify.tie_tolerance,
    )
    del merged
    if not checked.ok:
        bad = next(c for c in checked.checks if not c.equal)
        raise RuntimeError(
            f"ONNX greedy differs from PyTorch greedy at token {bad.diverged_at} "
            f"(logit gap {bad.gap_at_divergence:.4f}): the export is not faithful"
        )
    plan.switch_to_served(onnx_dir)
    laps.lap("verify_s")
    return plan, onnx_dir, checked


def _training_record(settings: JobSettings, inputs: _Inputs, trained: Any, laps: _Laps) -> dict[str, Any]:
    """How the candidate was trained, for its manifest."""
    import torch

    device = inputs.device
    return {
        "hyperparameters": settings.hyper.model_dump(),
        "loss_curve": trained.loss_curve,
        "epoch_losses": trained.epoch_losses,
        "steps": trained.steps,
        "examples_seen": trained.examples_seen,
        "answer_tokens": trained.answer_tokens,
        "total_tokens": trained.total_tokens,
        "seconds_per_step": round(trained.seconds_per_step, 3),
        "targets": inputs.targets,
        "preference_pairs": trained.preference_pairs,
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "quantization": inputs.quantization,
        "threads": torch.get_num_threads(),
        "versions": _versions(),
        "timings": laps.timings,
    }


def _lineage(args: JobArgs, inputs: _Inputs, adapter_sha: str, duration: float) -> dict[str, Any]:
    """Where the candidate came from: parent, batches, adapter, job, and the examples' counts."""
    dataset = inputs.dataset
    return {
        "parent_version": inputs.parent.version,
        "dataset_id": dataset.dataset_id,
        "dataset_sha256": dataset.sha256,
        # Every batch this candidate learned in full: this one and those carried over.
        "datasets": inputs.trained_on,
        "adapter_sha256": adapter_sha,
        "job_id": args.job_id,
        "examples": {
            "batch": len(dataset.examples),
            "carried_over": inputs.carried,
            "counts": dataset.manifest.get("counts", {}),
            "replayed": len(inputs.replay),
            "replayed_from": inputs.replay_from,
            "trained": len(inputs.examples),
            "skipped_too_long": inputs.skipped,
        },
        "duration_s": duration,
    }


def _already_registered(settings: JobSettings, args: JobArgs, candidate: ModelVersion) -> dict[str, Any]:
    """The result of a job whose earlier attempt registered its candidate and died before writing
    the result (a Kubernetes Job retries its pod): that candidate, not a second one."""
    lineage = candidate.manifest.get("lineage") or {}
    training = candidate.manifest.get("training") or {}
    result = {
        "status": "succeeded",
        "job_id": args.job_id,
        "dataset_id": lineage.get("dataset_id", ""),
        "base_version": lineage.get("parent_version", ""),
        "candidate_version": candidate.version,
        "epoch_losses": training.get("epoch_losses", []),
        "loss_curve": training.get("loss_curve", []),
        "steps": training.get("steps", 0),
        "seconds_per_step": training.get("seconds_per_step", 0.0),
        "duration_s": lineage.get("duration_s", 0.0),
        "device": training.get("device", ""),
        "quantization": training.get("quantization", ""),
        "timings": training.get("timings", {}),
        "finished_at": now_iso(),
        "pid": os.getpid(),
        "note": "registered by an earlier attempt of this job",
    }
    write_result(settings.artifact_root, args.job_id, result)
    log.warning(
        "job %s: an earlier attempt registered candidate %s; not training again",
        args.job_id,
        candidate.version,
        extra={"job_id": args.job_id},
    )
    return result


def run(settings: JobSettings, args: JobArgs) -> dict[str, Any]:
    """Trains, exports, checks and registers; returns the result (also written as result.json).

    A job whose candidate is registered already (an earlier attempt died after registering) only
    writes that candidate's result.
    """
    registry = ModelRegistry(settings.artifact_root)
    earlier = registered_candidate(registry, args.job_id)
    if earlier is not None:
        return _already_registered(settings, args, earlier)

    import torch

    laps = _Laps()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    inputs = _gather(settings, args, registry)
    _check_space(settings, inputs.parent)
    laps.lap("prepare_s")

    scratch = settings.scratch_dir / args.job_id
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        trained, adapter_sha, merged_dir = _train_and_merge(settings, inputs, scratch, laps)
        plan, onnx_dir, checked = _export_and_verify(settings, inputs, merged_dir, scratch, laps)
        training = _training_record(settings, inputs, trained, laps)
        duration = laps.total()
        # The scratch folders are final now: the registry links their files rather than copying them.
        freeze_tree(scratch)
        candidate = registry.register(
            onnx_dir,
            kind="candidate",
            hf_dir=merged_dir,
            metadata={
                "lineage": _lineage(args, inputs, adapter_sha, duration),
                "training": training,
                "verify": checked.summary(),
                "export": plan.record(),
            },
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "status": "succeeded",
        "job_id": args.job_id,
        "dataset_id": inputs.dataset.dataset_id,
        "base_version": inputs.parent.version,
        "candidate_version": candidate.version,
        "epoch_losses": trained.epoch_losses,
        "loss_curve": trained.loss_curve,
        "steps": trained.steps,
        "seconds_per_step": round(trained.seconds_per_step, 3),
        "duration_s": duration,
        "device": inputs.device,
        "quantization": inputs.quantization,
        "timings": laps.timings,
        "finished_at": now_iso(),
        "pid": os.getpid(),
    }
    write_result(settings.artifact_root, args.job_id, result)
    log.info(
        "job %s registered candidate %s in %.0f s (loss %s -> %s)",
        args.job_id, candidate.version, duration,
        trained.epoch_losses[0] if trained.epoch_losses else None,
        trained.epoch_losses[-1] if trained.epoch_losses else None,
    )  # fmt: skip
    return result


def fail(settings: JobSettings, args: JobArgs, exc: BaseException, started: float) -> dict[str, Any]:
    """Writes a failed result (the trainer shows its reason)."""
    result = {
        "status": "failed",
        "job_id": args.job_id,
        "reason": f"{type(exc).__name__}: {exc}"[:2000],
        "duration_s": round(time.perf_counter() - started, 1),
        "finished_at": now_iso(),
    }
    write_result(settings.artifact_root, args.job_id, result)
    return result
