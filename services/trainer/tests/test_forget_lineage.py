"""Forgetting a session: versions are marked through a dataset's whole lineage, the audit keeps no
raw personal data, and damaged datasets the forget could not search are reported."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from flywheel_common.registry import ModelRegistry
from flywheel_trainer import datasets
from flywheel_trainer.settings import TrainerSettings
from flywheel_trainer.store import JoinStore
from flywheel_trainer.trainer import Trainer

SESSIONS = ("a" * 32, "b" * 32, "c" * 32)


def make(tmp_path: Path, store: JoinStore, registry: ModelRegistry, clock: Any) -> Trainer:
    settings = TrainerSettings(artifact_root=registry.root, data_dir=tmp_path / "trainer")
    # Forgetting launches no job and announces nothing: no launcher or producer is needed.
    return Trainer(settings, store, None, registry, None, clock=clock)  # type: ignore[arg-type]


async def cut_sessions(trainer: Trainer, ev: Any, ids: range) -> str:
    """Cuts a dataset of one corrected answer per session, answer i in session SESSIONS[i % 3]."""
    for i in ids:
        trainer.store.ingest([ev.interaction(i, session=SESSIONS[i % 3])], [ev.correction(i)])
    cut = await trainer.cut("manual")
    assert cut is not None
    return cut.dataset_id


def audit(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "trainer" / "audit.jsonl").read_text().splitlines()]


async def test_a_second_forget_marks_the_version_trained_on_the_original_dataset(
    tmp_path: Path, store: JoinStore, registry: ModelRegistry, clock: Any, ev: Any
) -> None:
    trainer = make(tmp_path, store, registry, clock)
    ds_a = await cut_sessions(trainer, ev, range(3))
    model = tmp_path / "candidate"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"x")
    v2 = registry.register(model, kind="candidate", metadata={"lineage": {"datasets": [ds_a]}}).version

    first = await trainer.forget(SESSIONS[0], reason="ticket 1", caller="admin")
    [(_, ds_b, _)] = first.datasets
    second = await trainer.forget(SESSIONS[1], reason="ticket 2", caller="admin")
    [(old, ds_c, removed)] = second.datasets

    assert (old, removed) == (ds_b, 1)
    assert datasets.load(registry.root, ds_c).manifest["replaces"] == [ds_b, ds_a]
    assert first.marked_versions == second.marked_versions == [v2]
    assert [r["marked_versions"] for r in audit(tmp_path)] == [[v2], [v2]]
    marks = [(m["datasets"], m["replaced_by"]) for m in registry.marks(v2)]
    assert marks == [([ds_a], [ds_b]), ([ds_a], [ds_c])]


async def test_the_reason_is_stored_and_logged_redacted(
    tmp_path: Path,
    store: JoinStore,
    registry: ModelRegistry,
    clock: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    trainer = make(tmp_path, store, registry, clock)
    with caplog.at_level(logging.INFO, logger="flywheel_trainer.trainer"):
        await trainer.forget(SESSIONS[0], reason="ticket 42 from jane.doe@example.com", caller="admin")
    [record] = audit(tmp_path)
    assert record["reason"] == "ticket 42 from [EMAIL]"
    [logged] = [r for r in caplog.records if hasattr(r, "audit")]
    assert logged.audit["reason"] == "ticket 42 from [EMAIL]"
    assert "jane.doe" not in (tmp_path / "trainer" / "audit.jsonl").read_text() + caplog.text


async def test_a_damaged_dataset_is_reported_not_silently_skipped(
    tmp_path: Path,
    store: JoinStore,
    registry: ModelRegistry,
    clock: Any,
    ev: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    trainer = make(tmp_path, store, registry, clock)
    intact = await cut_sessions(trainer, ev, range(3))
    damaged = await cut_sessions(trainer, ev, range(3, 6))
    altered = registry.root / "datasets" / damaged / "examples.jsonl"
    altered.chmod(0o644)
    altered.write_bytes(altered.read_bytes() + b"\n")

    with caplog.at_level(logging.WARNING, logger="flywheel_trainer.trainer"):
        report = await trainer.forget(SESSIONS[0], reason="ticket 7", caller="admin")

    assert [old for old, _, _ in report.datasets] == [intact]
    [record] = audit(tmp_path)
    assert record["damaged_datasets"] == [damaged]
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert damaged in warning.getMessage() and SESSIONS[0] not in warning.getMessage()


async def test_a_forget_during_a_cut_waits_for_its_dataset_and_rewrites_it(
    tmp_path: Path,
    store: JoinStore,
    registry: ModelRegistry,
    clock: Any,
    ev: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trainer = make(tmp_path, store, registry, clock)
    for i in range(3):
        store.ingest([ev.interaction(i, session=SESSIONS[i % 3])], [ev.correction(i)])
    writing, release = threading.Event(), threading.Event()
    write = datasets.write

    def slow_write(*args: Any, **kwargs: Any) -> Any:
        if not writing.is_set():  # the cut's write: held until the test lets it go
            writing.set()
            release.wait(10)
        return write(*args, **kwargs)

    monkeypatch.setattr(datasets, "write", slow_write)
    cutting = asyncio.create_task(trainer.cut("manual"))
    assert await asyncio.to_thread(writing.wait, 10)
    forgetting = asyncio.create_task(trainer.forget(SESSIONS[0], reason="ticket 9", caller="admin"))
    with contextlib.suppress(TimeoutError):  # a forget that does not wait is done by then
        await asyncio.wait_for(asyncio.shield(forgetting), 0.5)
    release.set()
    cut = await cutting
    report = await forgetting

    assert cut is not None and [(old, n) for old, _, n in report.datasets] == [(cut.dataset_id, 1)]
    kept = [e["query_id"] for d in datasets.all_datasets(registry.root) for e in d.examples]
    assert kept == ["q1", "q2"]


async def test_a_vacuum_that_fails_leaves_no_dataset_unrewritten(
    tmp_path: Path,
    store: JoinStore,
    registry: ModelRegistry,
    clock: Any,
    ev: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The file's free pages are the last thing a forget cleans: a full disk then fails the call,
    not the rewrite of the datasets, and the same forget again finishes."""
    trainer = make(tmp_path, store, registry, clock)
    ds_a = await cut_sessions(trainer, ev, range(3))
    vacuum = store.vacuum

    def full_disk() -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "vacuum", full_disk)
    with pytest.raises(sqlite3.OperationalError):
        await trainer.forget(SESSIONS[0], reason="ticket 11", caller="admin")
    [found] = datasets.scan(registry.root)[0]
    assert found.dataset_id != ds_a and len(found.examples) == 2
    monkeypatch.setattr(store, "vacuum", vacuum)
    again = await trainer.forget(SESSIONS[0], reason="ticket 11", caller="admin")
    assert (again.examples, again.datasets) == (0, [])
