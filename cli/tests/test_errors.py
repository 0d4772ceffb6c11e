"""Every mistake a user can make on the command line prints one line that says what to do, no traceback."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel_cli.__main__ import main
from flywheel_cli.local.stack import LocalStack
from flywheel_common.registry import ModelRegistry


@pytest.fixture(scope="module")
def closed() -> str:
    """A loopback address where nothing listens (the service the user forgot to start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def page(tmp_path: Path) -> Path:
    path = tmp_path / "page.html"
    path.write_text("<html><body><p>The answer is 42.</p></body></html>")
    return path


def mistakes(closed: str, page: Path, tmp_path: Path) -> list[tuple[list[str], str]]:
    """(argv, words the one line must contain)."""
    binary = tmp_path / "page.bin"
    binary.write_bytes(b"\xff\xfe\x00bad")
    registry = ModelRegistry(tmp_path / "a").root
    return [
        (["ask", "why?", "--page", str(tmp_path / "missing.html")], "no page file"),
        (["ask", "why?", "--page", str(tmp_path)], "no page file"),
        (["ask", "why?", "--page", str(binary)], "not UTF-8"),
        (["ask", "why?", "--page", str(page), "--target", closed], "flywheel up"),
        (["feedback", "q1", "--rating", "5", "--token", "t", "--target", closed], "flywheel up"),
        (
            ["feedback", "q1", "--rating", "5", "--token", "t", "--tls-ca", str(tmp_path / "ca.pem")],
            "no such file",
        ),
        (["trainer", "--target", closed, "jobs"], "flywheel up"),
        (["trainer", "--target", closed, "trigger"], "flywheel up"),
        (["rollout", "--target", closed, "status"], "flywheel up"),
        (["rollout", "--target", closed, "rollback", "v1"], "--request-id"),
        (["model", "prepare", "--source", str(tmp_path / "missing.gguf")], "no model at"),
        (["model", "prepare", "--source", str(tmp_path), "--out", str(tmp_path / "out")], "neither"),
        (["model", "prune", "--keep-latest", "-1", "--artifact-root", str(registry)], "0 or more"),
        (["model", "list", "--artifact-root", str(tmp_path / "no-registry")], "no model registry at"),
        (["privacy", "--target", closed, "forget", "--session", "s1"], f"the trainer service at {closed}"),
        (["topic", "tail", "flywheel.feedback.v1", "--bootstrap", closed], "flywheel kafka start"),
        (["simulate", "--dataset", str(tmp_path / "no-dataset")], "bad dataset"),
    ]


def test_each_mistake_gets_one_line(
    closed: str,
    page: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FLYWHEEL_TOKEN", raising=False)
    cases = [*mistakes(closed, page, tmp_path), (["feedback", "q1", "--rating", "5"], "bearer token")]
    for argv, words in cases:
        assert main(argv) != 0, argv
        err = capfd.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (argv, err)
        assert lines[0].startswith(f"flywheel {argv[0]}: ") and "Traceback" not in err, (argv, err)


def test_library_logs_stay_quiet_outside_pytest(closed: str) -> None:
    # In a real process kafka-python's and gRPC's own logging would reach the terminal too.
    command = [
        sys.executable,
        "-m",
        "flywheel_cli",
        "topic",
        "tail",
        "flywheel.feedback.v1",
        "--bootstrap",
        closed,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert (
        line.startswith(f"flywheel topic: cannot reach Kafka at {closed} (")
        and "flywheel kafka start" in line
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["feedback", "q1", "--rating", "-1", "--token", "t"],
        ["feedback", "q1", "--rating", "5000000000", "--token", "t"],
        ["ask", "why?", "--page", "p.html", "--max-new-tokens", "-1"],
        ["ask", "why?", "--page", "p.html", "--max-new-tokens", "5000000000"],
        ["trainer", "jobs", "--limit", "-1"],
        ["rollout", "decisions", "--limit", "-1"],
        ["simulate", "--dataset", "d", "--concurrency", "0"],
        ["up", "--simulate", "d", "--concurrency", "0"],
    ],
)
def test_a_number_out_of_range_is_a_usage_error_before_any_call(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(LocalStack, "start", lambda self: pytest.fail("`up` started a stack"))
    # A request's uint32 field cannot hold it (a ValueError mid-call), or a run would never start.
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "out of range" in err or "invalid choice" in err, err
    assert "Traceback" not in err


def test_a_system_refusal_names_the_path_and_the_reason(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = ModelRegistry(tmp_path / "artifacts")
    lock = registry.models / ".lock"

    def read_only(self: ModelRegistry, keep_latest: int, *, dry_run: bool = False) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(lock))

    monkeypatch.setattr(ModelRegistry, "prune", read_only)
    assert main(["model", "prune", "--dry-run", "--artifact-root", str(registry.root)]) == 1
    err = capfd.readouterr().err
    assert err.splitlines() == [f"flywheel model: {lock}: {os.strerror(errno.EROFS)}"]
