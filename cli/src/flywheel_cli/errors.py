"""What the CLI says when a user's call goes wrong: one line that says what to do, never a traceback."""

from __future__ import annotations

import argparse

import grpc
from kafka.errors import KafkaError

from flywheel_eval.dataset import DatasetError

# The service each command talks to, for messages about reaching it.
_SERVICES = {
    "ask": "inference",
    "feedback": "feedback",
    "trainer": "trainer",
    "rollout": "evaluator",
    "privacy": "trainer",  # the trainer first; the evaluator's failure is reported by the command
}
_START = "start the system with `uv run flywheel up` (or point --target at a running service)"


class UserError(Exception):
    """A mistake the user can fix (a missing file, a bad flag); its text says how."""


def _rpc(err: grpc.RpcError, args: argparse.Namespace) -> str:
    code, details = err.code(), err.details() or ""
    service = _SERVICES.get(args.command)
    where = f"the {service} service at {args.target}" if service else "a Flywheel service"
    if code == grpc.StatusCode.UNAVAILABLE:
        start = _START if service else "start the system with `uv run flywheel up`, or pass --up"
        return f"cannot reach {where}; {start}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{where} did not answer in time; try again with a larger --timeout"
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return f"{where} refused the token: {details}; pass a token with the right role (--token)"
    if code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
    ):
        return f"{where} refused the request: {details}"
    return f"{where} failed: {code.name}: {details}"


def explain(exc: BaseException, args: argparse.Namespace) -> str | None:
    """The one line for an error the user can act on; None for a bug (which keeps its traceback)."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, grpc.RpcError):
        return _rpc(exc, args)
    if isinstance(exc, KafkaError):
        where = getattr(args, "bootstrap", None) or "the configured broker"
        start = "start it with `uv run flywheel kafka start`"
        return f"cannot reach Kafka at {where} ({type(exc).__name__}); {start}"
    if isinstance(exc, DatasetError):
        return f"bad dataset: {exc}"
    if isinstance(exc, FileNotFoundError):
        return f"no such file: {exc.filename}"
    if isinstance(exc, IsADirectoryError):
        return f"{exc.filename} is a folder; give a file"
    if isinstance(exc, PermissionError):
        return f"cannot read {exc.filename}: permission denied"
    if isinstance(exc, OSError) and exc.errno is not None:
        # The system refused (a read-only mount, a full disk, a path through a file): the path and
        # its reason. An OSError without an errno (a bare TimeoutError) is a bug and keeps its traceback.
        reason = exc.strerror or str(exc)
        paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
        return f"{' -> '.join(paths)}: {reason}" if paths else reason
    return None
