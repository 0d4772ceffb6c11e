"""`flywheel model prune` and `list`: what retention removed, as an SRE sees it."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel_cli.__main__ import main
from flywheel_common.registry import ModelRegistry


def test_prune_says_what_it_frees_and_list_shows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"x" * 2**20)
    registry = ModelRegistry(tmp_path / "artifacts")
    for kind in ("base", "candidate", "candidate"):
        registry.register(model, kind=kind)
    registry.set_production("v1")
    registry.append_decision({"version": "v2", "action": "gate", "passed": False})
    root = ["--artifact-root", str(tmp_path / "artifacts")]

    assert main(["model", "prune", "--keep-latest", "0", "--dry-run", *root]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "v2     would free 1 MiB",
        "versions to prune: 1 (1 MiB)",
    ]
    assert main(["model", "prune", "--keep-latest", "0", *root]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "versions pruned: 1 (1 MiB)"
    assert main(["model", "list", *root]) == 0
    roles = {line.split()[0]: line.split()[3:] for line in capsys.readouterr().out.splitlines()[:3]}
    assert roles == {"v1": ["production"], "v2": ["pruned"], "v3": []}  # v3 is not gated yet


@pytest.mark.parametrize("command", [["list"], ["prune"], ["prune", "--dry-run"]])
def test_a_path_without_a_registry_is_refused_and_left_as_it_was(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Opening a registry there would create an empty one, and "versions to prune: 0" hides the typo.
    wrong = tmp_path / "artifact"
    assert main(["model", *command, "--artifact-root", str(wrong)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"flywheel model: no model registry at {wrong} (expected {wrong}/models/versions); "
        "check --artifact-root"
    ]
    assert not wrong.exists()
