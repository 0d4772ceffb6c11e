"""A training job stopped by SIGTERM (the local launcher's stop, a pod's deletion) cleans up first:
no scratch folder, no half-made registration left behind, gigabytes each in a real job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The job's entry point with its heavy steps replaced: "merge" stops in the middle of training (its
# scratch folder full), "register" in the middle of copying the candidate into the registry.
CHILD = r"""
import sys, time, types
from pathlib import Path

sys.modules.setdefault("torch", types.ModuleType("torch"))  # the job imports it; nothing here uses it
from flywheel_common import registry as registry_module
import flywheel_trainer.job.__main__ as entry
import flywheel_trainer.job.run as run

phase, ready, model = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])


def stall() -> None:
    ready.touch()
    time.sleep(60)


if phase == "merge":
    parent = types.SimpleNamespace(version="v1")
    run._gather = lambda *a: types.SimpleNamespace(parent=parent)
    run._check_space = lambda *a: None

    def merge(settings, inputs, scratch, laps):
        (scratch / "hf").mkdir()
        (scratch / "hf" / "model.safetensors").write_bytes(b"\0" * 4096)
        stall()

    run._train_and_merge = merge
else:
    real_sha256 = registry_module.file_sha256

    def slow_sha256(path):
        stall()
        return real_sha256(path)

    registry_module.file_sha256 = slow_sha256
    entry.run = lambda settings, args: registry_module.ModelRegistry(settings.artifact_root).register(
        model, kind="candidate", hf_dir=model
    )
sys.exit(entry.main(["--dataset", "ds-x", "--base-version", "v1", "--job-id", "job-stopped"]))
"""


@pytest.mark.parametrize("phase", ["merge", "register"])
def test_a_job_stopped_by_sigterm_leaves_no_scratch_and_no_staging(tmp_path: Path, phase: str) -> None:
    artifacts, scratch_dir, ready = tmp_path / "artifacts", tmp_path / "scratch", tmp_path / "ready"
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"\0" * 4096)
    env = {
        **os.environ,
        "FLYWHEEL_TRAINER_JOB_ARTIFACT_ROOT": str(artifacts),
        "FLYWHEEL_TRAINER_JOB_SCRATCH_DIR": str(scratch_dir),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, phase, str(ready), str(model)],
        env=env,
        stdout=subprocess.PIPE,  # the job logs JSON lines to stdout
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()[0].decode()
            assert time.monotonic() < deadline, "the job never reached the step"
            time.sleep(0.05)
        assert (scratch_dir / "job-stopped").is_dir() or list(
            (artifacts / "models" / "versions").glob(".staging-*")
        )
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, output.decode()
    assert "stopped by SIGTERM" in output.decode()
    assert not (scratch_dir / "job-stopped").exists()
    versions = artifacts / "models" / "versions"
    assert [p.name for p in versions.iterdir()] == []  # no staging folder, and no version
