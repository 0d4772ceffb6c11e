"""The model registry: immutable version folders and an atomically updated rollout state.

Layout under the artifact root:
    models/versions/<version>/      immutable: model/ (ONNX, tokenizer), hf/ (weights to train
                                    from), manifest.json; `prune` removes model/ and hf/ of versions
                                    nothing needs any more, and the manifest stays
    models/versions/.staging-*      a registration under way, renamed to its version when whole;
                                    `prune` removes one a killed registration left, after a day
    models/rollout.json             production, canary, split, pin, and the decisions not yet sent
                                    (the outbox); replaced atomically
    models/reports/<version>/       evaluation reports written next to the version
    models/decisions.jsonl          every rollout decision, appended
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flywheel_common.errors import FailedPrecondition, InvalidArgument, NotFound
from flywheel_common.files import file_sha256, freeze_tree, share_tree, tree_bytes

log = logging.getLogger(__name__)

_VERSION_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")

# A `.staging-*` folder older than this is left by a registration that was killed (SIGKILL, a lost
# node): a live registration takes no lock while it copies, so its age is what tells them apart, and
# copying and hashing even a multi-GB model takes minutes, not a day.
STAGING_MAX_AGE_S = 24 * 3600.0


def check_version_name(version: str) -> None:
    """InvalidArgument unless `version` can name a version (which also keeps NUL bytes and over-long
    names away from the file system, where they raise ValueError and OSError)."""
    if not _VERSION_NAME.fullmatch(version):
        raise InvalidArgument(
            "bad version name: 1-128 letters, digits, '.', '_' or '-', not starting with '.'"
        )


MANIFEST = "manifest.json"


def _fsync_path(path: Path) -> None:
    """Flushes a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flushes every file and folder under `root`, and `root` itself, to disk."""
    for path in root.rglob("*"):
        if not path.is_symlink():
            _fsync_path(path)
    _fsync_path(root)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# How many applied admin request ids the rollout state remembers (retries come within seconds).
_REQUESTS_KEPT = 50


@dataclass
class RolloutState:
    """Which versions serve traffic; every replica converges on this."""

    production: str | None = None
    canary: str | None = None
    canary_fraction: float = 0.0
    pinned: bool = False
    auto_rollout: bool = True
    # The version production was before the current one (what a rollback without a version restores);
    # None after a rollback, whose version before is the one just taken out of service.
    previous_production: str | None = None
    # Admin requests already applied: request id -> decision id (the newest few), so a retried call
    # does not move the rollout twice.
    requests: dict[str, str] = field(default_factory=dict)
    # Decisions committed with the move they record (in the same write), not yet appended to
    # decisions.jsonl and produced on Kafka; the evaluator empties it (docs/evaluator.md).
    outbox: list[dict[str, Any]] = field(default_factory=list)
    generation: int = 0
    updated_at: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutState:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def _serving(state: RolloutState) -> tuple[Any, ...]:
    """What replicas follow: a change to any of it is a new generation."""
    return state.production, state.canary, state.canary_fraction, state.pinned, state.auto_rollout


@dataclass(frozen=True)
class ModelVersion:
    """A registered, immutable model version."""

    version: str
    path: Path
    manifest: dict[str, Any]

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def hf_dir(self) -> Path:
        return self.path / "hf"

    @property
    def kind(self) -> str:
        return str(self.manifest.get("kind", "unknown"))

    @property
    def pruned(self) -> bool:
        """Whether retention removed its weights (`ModelRegistry.prune`): it cannot serve again."""
        return not self.model_dir.exists()


@dataclass(frozen=True)
class Pruned:
    """A version whose weights `ModelRegistry.prune` removed, and the bytes that freed (files
    hard-linked elsewhere, such as a base's prepared cache, free nothing)."""

    version: str
    freed_bytes: int


class ModelRegistry:
    """Registers versions and moves the rollout pointers; safe across processes sharing the folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.models = self.root / "models"
        self.versions_dir = self.models / "versions"
        self.reports_dir = self.models / "reports"
        self.state_path = self.models / "rollout.json"
        self.decisions_path = self.models / "decisions.jsonl"
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self.reports_dir.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with (self.models / ".lock").open("a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _write_atomic(self, path: Path, data: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # Versions

    def _next_version(self) -> str:
        numbers = [int(p.name[1:]) for p in self.versions_dir.glob("v*") if p.name[1:].isdigit()]
        return f"v{max(numbers, default=0) + 1}"

    def register(
        self,
        model_dir: Path,
        *,
        kind: str,
        hf_dir: Path | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> ModelVersion:
        """Copies a prepared model folder (and its HF weights, for training) in as a new immutable
        version, all or nothing."""
        model_dir = Path(model_dir)
        if not (model_dir / "model.onnx").is_file():
            raise InvalidArgument(f"{model_dir} holds no model.onnx")
        staging = Path(tempfile.mkdtemp(dir=self.versions_dir, prefix=".staging-"))
        try:
            share_tree(model_dir, staging / "model")
            if hf_dir is not None:
                share_tree(hf_dir, staging / "hf")
            files = {
                str(p.relative_to(staging)): file_sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()
            }
            with self._lock():
                version = self._next_version()
                manifest = {
                    "version": version,
                    "kind": kind,
                    "created_at": now_iso(),
                    "files": files,
                    **(metadata or {}),
                }
                self._write_atomic(staging / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
                freeze_tree(staging)
                # Files, manifest and folders on disk before the rename names them a version, and the
                # rename on disk after: a power loss leaves a whole version or none, never an empty
                # manifest.
                _fsync_tree(staging)
                os.rename(staging, self.versions_dir / version)
                _fsync_path(self.versions_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("registered model version %s (%s)", version, kind)
        return self.get(version)

    def get(self, version: str) -> ModelVersion:
        """A registered version, or NotFound."""
        check_version_name(version)
        path = self.versions_dir / version
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise NotFound(f"no model version {version}")
        return ModelVersion(version, path, json.loads(manifest_path.read_text()))

    def servable(self, version: str) -> ModelVersion:
        """A registered version that still has its weights; FailedPrecondition for a pruned one."""
        mv = self.get(version)
        if mv.pruned:
            raise FailedPrecondition(
                f"{version}'s weights were removed by retention (its manifest, reports and decisions "
                "stay); it cannot serve again"
            )
        return mv

    def list_versions(self) -> list[ModelVersion]:
        """Every registered version, oldest first; one whose manifest cannot be read or parsed is
        logged and left out, so it does not break every registry-wide read."""
        names = [p.name for p in self.versions_dir.glob("v*") if (p / MANIFEST).is_file()]
        versions = []
        for name in sorted(names, key=lambda n: int(n[1:]) if n[1:].isdigit() else 0):
            try:
                mv = self.get(name)
            except (OSError, ValueError, InvalidArgument, NotFound) as exc:  # ValueError: JSON, UTF-8
                # The error's type only: its message could quote the manifest's bytes.
                log.warning(
                    "model version %s left out: its manifest is unreadable (%s)", name, type(exc).__name__
                )
                continue
            if not isinstance(mv.manifest, dict):
                log.warning("model version %s left out: its manifest is not a JSON object", name)
                continue
            versions.append(mv)
        return versions

    def verify(self, version: str, part: str = "") -> ModelVersion:
        """The version, once the files under `part` (`model`, `hf`; all by default) are exactly those
        its manifest lists, with their digests; FailedPrecondition otherwise."""
        mv = self.servable(version)
        prefix = f"{part}/" if part else ""
        listed = {rel: d for rel, d in mv.manifest.get("files", {}).items() if rel.startswith(prefix)}
        root = mv.path / part if part else mv.path
        found = {str(p.relative_to(mv.path)) for p in root.rglob("*") if p.is_file()} - {MANIFEST}
        if extra := sorted(found - set(listed)):
            raise FailedPrecondition(f"{version}: {extra[0]} is not in its manifest")
        if missing := sorted(set(listed) - found):
            raise FailedPrecondition(f"{version}: {missing[0]} is missing")
        for rel, digest in listed.items():
            if file_sha256(mv.path / rel) != digest:
                raise FailedPrecondition(f"{version}: {rel} does not match its manifest")
        return mv

    # Marks: notes on immutable versions (a version's folder never changes after registration)

    def mark(self, version: str, note: dict[str, Any]) -> None:
        """Adds a note to a version, e.g. that data it was trained on has since been forgotten."""
        self.get(version)
        marks_dir = self.models / "marks"
        marks_dir.mkdir(exist_ok=True)
        with self._lock():
            path = marks_dir / f"{version}.json"
            notes = json.loads(path.read_text()) if path.is_file() else []
            self._write_atomic(
                path, json.dumps([*notes, {"at": now_iso(), **note}], indent=2, sort_keys=True)
            )

    def marks(self, version: str) -> list[dict[str, Any]]:
        """A version's notes, oldest first."""
        path = self.models / "marks" / f"{version}.json"
        return list(json.loads(path.read_text())) if path.is_file() else []

    # Retention: a version's weights are its bulk; its manifest, marks, reports and decisions stay

    def prune(
        self, keep_latest: int, *, dry_run: bool = False, staging_max_age_s: float = STAGING_MAX_AGE_S
    ) -> list[Pruned]:
        """Removes the weights (model/ and hf/) of the versions nothing needs any more; returns them.

        Kept: production, the canary, the previous production (what a rollback restores), every
        base, the `keep_latest` newest versions, and every version without a recorded decision (a
        candidate the gate has not judged yet). A pruned version's lineage, reports and decisions
        still read; `update_state` refuses to serve it. `dry_run` returns what would go.

        Also removes `.staging-*` folders older than `staging_max_age_s` (unless `dry_run`): what a
        killed registration left.
        """
        if keep_latest < 0:
            raise InvalidArgument("keep_latest must be 0 or more")
        pruned: list[Pruned] = []
        if not dry_run:
            self._sweep_staging(staging_max_age_s)
        with self._lock():
            for stale in self.versions_dir.glob(".pruning-*"):  # left by a prune that stopped midway
                shutil.rmtree(stale, ignore_errors=True)
            trash = Path(tempfile.mkdtemp(dir=self.versions_dir, prefix=".pruning-"))
            state = self.state()
            decided = {str(d.get("version", "")) for d in self.decisions()}
            versions = self.list_versions()
            newest = {v.version for v in versions[-keep_latest:]} if keep_latest else set()
            needed = {state.production, state.canary, state.previous_production} | newest
            for mv in versions:
                if mv.pruned or mv.version in needed or mv.kind == "base" or mv.version not in decided:
                    continue
                parts = [p for p in (mv.model_dir, mv.hf_dir) if p.exists()]
                pruned.append(Pruned(mv.version, sum(tree_bytes(part, unshared=True) for part in parts)))
                if not dry_run:
                    for part in parts:  # a rename: the version is whole or pruned, never half
                        os.rename(part, trash / f"{mv.version}-{part.name}")
        shutil.rmtree(trash, ignore_errors=True)
        for item in pruned if not dry_run else []:
            self.mark(item.version, {"kind": "pruned", "freed_bytes": item.freed_bytes})
            log.info("pruned model version %s (%d bytes freed)", item.version, item.freed_bytes)
        return pruned

    def _sweep_staging(self, max_age_s: float) -> None:
        """Removes the `.staging-*` folders last changed more than `max_age_s` ago."""
        cutoff = time.time() - max_age_s
        for staging in self.versions_dir.glob(".staging-*"):
            try:
                if staging.stat().st_mtime >= cutoff:
                    continue  # possibly a registration still copying
                freed = tree_bytes(staging, unshared=True)
            except OSError:
                continue  # renamed into a version meanwhile
            shutil.rmtree(staging, ignore_errors=True)
            log.warning(
                "removed %s, left by a registration that did not finish (%d bytes freed)", staging.name, freed
            )

    # Rollout state

    def state(self) -> RolloutState:
        """The current rollout state (a fresh read)."""
        try:
            return RolloutState.from_json(json.loads(self.state_path.read_text()))
        except FileNotFoundError:
            return RolloutState()

    def update_state(self, change: Callable[[RolloutState], str], *, rollback: bool = False) -> RolloutState:
        """Applies `change` (which returns a note for the history) under the lock, atomically.

        A change of production keeps the version it replaced as `previous_production`, unless it is a
        `rollback`: then there is none, so a rollback without a version cannot bring back the version
        just rolled back from. A change that moves nothing and returns no note (the outbox only) keeps
        the generation and history, so replicas have nothing to reload.
        """
        with self._lock():
            state = self.state()
            before = state.production
            serving = _serving(state)
            note = change(state)
            for name in (state.production, state.canary):
                if name:
                    self.servable(name)
            if state.production != before:
                state.previous_production = None if rollback else before
            state.requests = dict(list(state.requests.items())[-_REQUESTS_KEPT:])
            if note or _serving(state) != serving:
                state.generation += 1
                state.updated_at = now_iso()
                state.history.append({"at": state.updated_at, "generation": state.generation, "note": note})
                state.history = state.history[-200:]
            self._write_atomic(self.state_path, json.dumps(asdict(state), indent=2))
        if note:
            log.info("rollout state %d: %s", state.generation, note)
        return state

    def set_production(self, version: str, *, reason: str = "") -> RolloutState:
        """Makes `version` production for all traffic and ends any canary."""
        self.get(version)

        def change(state: RolloutState) -> str:
            state.production, state.canary, state.canary_fraction = version, None, 0.0
            return f"production -> {version}" + (f" ({reason})" if reason else "")

        return self.update_state(change)

    def set_canary(self, version: str | None, fraction: float = 0.0, *, reason: str = "") -> RolloutState:
        """Routes `fraction` of sessions to `version`; None ends the canary."""
        if version is not None:
            self.get(version)
        if not 0.0 <= fraction <= 1.0:
            raise InvalidArgument("canary fraction must be within [0, 1]")

        def change(state: RolloutState) -> str:
            state.canary, state.canary_fraction = version, (fraction if version else 0.0)
            note = f"canary -> {version} at {fraction:.0%}" if version else "canary ended"
            return note + (f" ({reason})" if reason else "")

        return self.update_state(change)

    # Reports and decisions

    def write_report(self, version: str, name: str, content: str) -> Path:
        """Writes a report file next to a version (reports may be rewritten; versions may not)."""
        self.get(version)
        folder = self.reports_dir / version
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        self._write_atomic(path, content)
        return path

    def append_decision(self, decision: dict[str, Any]) -> None:
        """Appends one decision record (a JSON line)."""
        with self._lock(), self.decisions_path.open("a") as f:
            f.write(json.dumps(decision, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def decisions(self) -> list[dict[str, Any]]:
        """Every recorded decision, oldest first."""
        if not self.decisions_path.is_file():
            return []
        return [json.loads(line) for line in self.decisions_path.read_text().splitlines() if line.strip()]
