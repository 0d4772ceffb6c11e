"""Every mistake a user can make on the command line prints one line that says what to do, no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel_cli.__main__ import main


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
        (["model", "prune", "--keep-latest", "-1", "--artifact-root", str(tmp_path / "a")], "0 or more"),
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
