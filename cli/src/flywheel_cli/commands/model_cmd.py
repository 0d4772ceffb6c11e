"""`flywheel model prepare|list|prune`: make the ONNX model reproducibly, register it, list the
versions and remove the weights of those nothing needs any more."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flywheel_cli.errors import UserError
from flywheel_common.errors import InvalidArgument
from flywheel_common.registry import ModelRegistry
from flywheel_model.prepare import (
    PACKAGED_MODELS,
    SERVED_BASE_MODEL,
    ExportOptions,
    default_precision,
    ensure_prepared,
    register_base,
    resolve_source,
)


def _prepare(args: argparse.Namespace) -> int:
    try:
        source = resolve_source(args.source)
    except FileNotFoundError as error:
        raise UserError(str(error)) from error
    if source is not None and not source.exists():
        raise UserError(
            f"no model at {source}: --source takes a .gguf file, a Hugging Face model folder or one of "
            f"{', '.join(PACKAGED_MODELS)}"
        )
    precision = args.precision or default_precision(args.provider)
    try:
        options = ExportOptions(precision=precision, provider=args.provider)
    except ValueError as error:
        raise UserError(str(error)) from error
    try:
        out = ensure_prepared(
            source, options, Path(args.out) if args.out else None, force=args.force, echo=print
        )
    except (ValueError, RuntimeError) as error:
        # The first line says what is wrong (an export failure's names its log).
        raise UserError(str(error).splitlines()[0]) from error
    if not args.no_register:
        register_base(out, Path(args.artifact_root), echo=print)
    return 0


def _existing_registry(artifact_root: str) -> ModelRegistry:
    """The registry at `artifact_root`; refuses a path that holds none, where opening one would make
    an empty registry (and a wrong path would read as "nothing registered")."""
    root = Path(artifact_root)
    versions = root / "models" / "versions"
    if not versions.is_dir():
        raise UserError(f"no model registry at {root} (expected {versions}); check --artifact-root")
    return ModelRegistry(root)


def _list(args: argparse.Namespace) -> int:
    registry = _existing_registry(args.artifact_root)
    state = registry.state()
    for version in registry.list_versions():
        role = "production" if version.version == state.production else ""
        role = "canary" if version.version == state.canary else role
        role = "pruned" if version.pruned else role
        print(f"{version.version:6} {version.kind:10} {version.manifest.get('created_at', ''):26} {role}")
    print(
        json.dumps({"production": state.production, "canary": state.canary, "split": state.canary_fraction})
    )
    return 0


def _prune(args: argparse.Namespace) -> int:
    registry = _existing_registry(args.artifact_root)
    try:
        pruned = registry.prune(args.keep_latest, dry_run=args.dry_run)
    except InvalidArgument as error:
        raise UserError(str(error)) from error
    verb = "would free" if args.dry_run else "freed"
    for item in pruned:
        print(f"{item.version:6} {verb} {item.freed_bytes / 2**20:,.0f} MiB")
    total = sum(item.freed_bytes for item in pruned)
    print(f"versions {'to prune' if args.dry_run else 'pruned'}: {len(pruned)} ({total / 2**20:,.0f} MiB)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Adds `model prepare|list|prune` to the flywheel command."""
    model = subparsers.add_parser("model", help="prepare, export, list and prune model versions")
    commands = model.add_subparsers(dest="model_command", required=True)
    prep = commands.add_parser(
        "prepare", help="GGUF or Hugging Face folder -> fp32 HF folder -> ONNX (cached), then register it"
    )
    prep.add_argument(
        "--source",
        help="a .gguf file, a Hugging Face causal-LM folder, or a packaged model: "
        f"{', '.join(PACKAGED_MODELS)} (default: {SERVED_BASE_MODEL})",
        default=SERVED_BASE_MODEL,
    )
    prep.add_argument(
        "--precision",
        choices=["fp32", "fp16", "int4", "gguf", "gguf_a8"],
        help="default: fp32 on the CPU, fp16 on CUDA; gguf / gguf_a8 store a GGUF's own blocks "
        "(docs/inference.md)",
    )
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
    prune = commands.add_parser(
        "prune",
        help="remove the weights of versions nothing needs: not production, the canary, the previous "
        "production, a base, one of the newest --keep-latest or a candidate not gated yet",
    )
    prune.add_argument("--keep-latest", type=int, default=5, help="newest versions kept (default 5)")
    prune.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    prune.add_argument("--artifact-root", default="var/artifacts")
    prune.set_defaults(func=_prune)
