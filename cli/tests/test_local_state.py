"""A simulation starts from a clean state of its own unless told to resume; the report says which."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from flywheel_cli.local.options import add_stack_args, stack_config
from flywheel_cli.local.stack import LocalStack, StackConfig, StackError, describe_state, runs_on_disk
from flywheel_common.registry import ModelRegistry
from flywheel_model.prepare import SERVED_BASE_MODEL


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_stack_args(parser)
    return parser.parse_args(list(argv))


def test_a_simulation_gets_a_fresh_state_folder_and_broker(tmp_path: Path) -> None:
    config = stack_config(parse("--var", str(tmp_path)), "datasets/python-faq", simulating=True)
    assert config.var_dir.parent == tmp_path / "runs" and config.own_broker
    resumed = stack_config(parse("--var", str(tmp_path), "--resume"), None, simulating=True)
    assert resumed.var_dir == tmp_path and not resumed.own_broker
    running = stack_config(parse("--var", str(tmp_path)), None)  # `flywheel up` keeps its state
    assert running.var_dir == tmp_path and not running.own_broker
    external = stack_config(parse("--var", str(tmp_path), "--kafka", "h:1"), None, simulating=True)
    assert external.var_dir == tmp_path  # an external broker holds the other runs' offsets anyway


def test_the_base_model_is_the_served_one_unless_named(tmp_path: Path) -> None:
    assert stack_config(parse("--var", str(tmp_path)), None).base_model == SERVED_BASE_MODEL
    named = stack_config(parse("--var", str(tmp_path), "--base-model", "smollm2-135m"), None, simulating=True)
    assert named.base_model == "smollm2-135m"
    missing = LocalStack(StackConfig(var_dir=tmp_path, base_model=str(tmp_path / "absent.gguf")))
    with pytest.raises(StackError, match="no base model"):
        missing.start()


def test_the_state_at_start_is_described(tmp_path: Path) -> None:
    config = StackConfig(var_dir=tmp_path)
    assert describe_state(config).startswith("a clean state in ")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"stub")
    registry = ModelRegistry(config.artifact_root)
    for _ in range(3):
        registry.register(model, kind="test")
    registry.set_production("v3")
    (config.artifact_root / "datasets" / "ds-1").mkdir(parents=True)
    described = describe_state(config)
    assert described.startswith(f"the state in {tmp_path}: 3 model versions (production v3), 1 training")


def test_old_runs_say_what_deleting_them_frees(tmp_path: Path) -> None:
    assert runs_on_disk(tmp_path / "runs") == (0, 0)
    shared = tmp_path / "cache-model.onnx"
    shared.write_bytes(b"x" * 1000)
    for name, size in (("20261201-100000", 300), ("20261202-100000", 200)):
        versions = tmp_path / "runs" / name / "artifacts" / "models" / "versions" / "v1"
        versions.mkdir(parents=True)
        (versions / "weights.bin").write_bytes(b"w" * size)
        (versions / "model.onnx").hardlink_to(shared)  # the base, linked from the prepared cache
    (tmp_path / "runs" / "notes.txt").write_text("not a run")
    assert runs_on_disk(tmp_path / "runs") == (2, 500)
