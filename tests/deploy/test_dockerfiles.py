"""The Dockerfiles: hadolint, and the house rules (pinned multi-stage bases, locked deps first, non-root)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import flywheel_deploy_checks as dc
import pytest

DOCKERFILES = sorted(dc.ROOT.glob("services/*/Dockerfile"))


def ids(p: Path) -> str:
    return p.parent.name


def test_every_service_has_a_dockerfile() -> None:
    folders = {p.name for p in (dc.ROOT / "services").iterdir() if (p / "pyproject.toml").exists()}
    assert folders | set(dc.SERVICES) <= {ids(p) for p in DOCKERFILES}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_hadolint(hadolint: Path, dockerfile: Path) -> None:
    proc = subprocess.run(
        [str(hadolint), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        cwd=dc.ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_house_rules(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert dc.dockerfile_errors(text) == []
    assert f"--package flywheel-{ids(dockerfile)}" in text


def test_cuda_images_for_inference_and_training() -> None:
    inference = dc.dockerfile_of("inference").read_text()
    trainer = dc.dockerfile_of("trainer").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-ubuntu", inference, re.M)
    assert re.search(r"^FROM \$\{CUDA_IMAGE\} AS job$", trainer, re.M)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS service$", trainer, re.M)


def test_onnxruntime_gpu_matches_the_locked_onnxruntime() -> None:
    lock = (dc.ROOT / "uv.lock").read_text()
    locked = re.search(r'^name = "onnxruntime"\nversion = "([^"]+)"', lock, re.M)
    assert locked, "onnxruntime is not in uv.lock"
    dockerfile = (dc.ROOT / "services" / "inference" / "Dockerfile").read_text()
    pinned = re.search(r"^ARG ONNXRUNTIME_GPU_VERSION=(\S+)$", dockerfile, re.M)
    assert pinned and pinned.group(1) == locked.group(1)


def test_one_uv_and_python_everywhere() -> None:
    texts = [p.read_text() for p in DOCKERFILES]
    for arg in ("UV_IMAGE", "PYTHON_IMAGE", "PYTHON_VERSION", "CUDA_IMAGE"):
        values = {m for t in texts for m in re.findall(rf"^ARG {arg}=(\S+)$", t, re.M)}
        assert len(values) <= 1, f"{arg} differs between Dockerfiles: {values}"


# ---------------------------------------------------------------- each check fails on a broken input

BROKEN = """\
FROM python:latest
WORKDIR /src
COPY . .
RUN pip install uv && uv sync
ENTRYPOINT ["python", "-m", "flywheel_feedback"]
"""


def test_house_rules_catch_a_broken_dockerfile() -> None:
    errors = dc.dockerfile_errors(BROKEN)
    assert "not multi-stage (fewer than two FROM)" in errors
    assert any("python:latest is not pinned" in e for e in errors)
    assert any("without --frozen" in e for e in errors)
    assert any("runs as root" in e for e in errors)
    late = (
        BROKEN.replace("FROM python:latest", "FROM python:3.11.14-slim AS b\nFROM python:3.11.14-slim")
        .replace("COPY . .", "COPY services/feedback/src services/feedback/src")
        .replace("uv sync", "uv sync --frozen")
    )
    assert any("sources copied before" in e for e in dc.dockerfile_errors(late))


def test_hadolint_catches_a_broken_dockerfile(hadolint: Path, tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text(BROKEN)
    proc = subprocess.run(
        [str(hadolint), "--no-color", "Dockerfile"], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # FROM ...:latest


def sync_cases() -> list[tuple[Path, int]]:
    return [(p, i) for p in DOCKERFILES for i, _ in enumerate(dc.uv_sync_steps(p.read_text()))]


@pytest.mark.parametrize(
    ("dockerfile", "step"), sync_cases(), ids=lambda v: ids(v) if isinstance(v, Path) else str(v)
)
def test_locked_install_works_with_what_the_stage_copies(dockerfile: Path, step: int, tmp_path: Path) -> None:
    """Each `uv sync --frozen` step, replayed on exactly the files its stage copied (a dry run, offline)."""
    uv = shutil.which("uv")
    if not uv:
        pytest.skip("uv is not on PATH")
    stage, copies, command = dc.uv_sync_steps(dockerfile.read_text())[step]
    error = dc.replay_uv_sync(copies, command, uv, sys.executable, tmp_path)
    assert error == "", f"stage {stage}: {command}\n{error}"


def test_replay_catches_a_missing_workspace_member(tmp_path: Path) -> None:
    uv = shutil.which("uv")
    if not uv:
        pytest.skip("uv is not on PATH")
    original = dc.dockerfile_of("inference").read_text()
    no_sources = original.replace("COPY libs/model libs/model\n", "")
    _, copies, command = dc.uv_sync_steps(no_sources)[1]
    assert "--no-editable" in command
    assert "sources were not copied" in dc.replay_uv_sync(copies, command, uv, sys.executable, tmp_path / "a")
    no_manifest = no_sources.replace("COPY libs/model/pyproject.toml libs/model/\n", "")
    _, copies, command = dc.uv_sync_steps(no_manifest)[1]
    assert dc.replay_uv_sync(copies, command, uv, sys.executable, tmp_path / "b") != ""
