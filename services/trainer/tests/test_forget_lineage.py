"""Forgetting a session: versions are marked through a dataset's whole lineage and their own, the
audit keeps no raw personal data, damaged datasets the forget could not search are reported, and
what killed dataset writes left is removed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from flywheel_common.registry import ModelRegistry
from flywheel_proto.flywheel.events.v1 import events_pb2
from flywheel_trainer import datasets
from flywheel_trainer.policy import FeedbackSignal
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


def _candidate(tmp_path: Path, registry: ModelRegistry, name: str, **lineage: Any) -> str:
    model = tmp_path / name
    model.mkdir()
    (model / "model.onnx").write_bytes(name.encode())
    return registry.register(model, kind="candidate", metadata={"lineage": lineage}).version


async def test_versions_fine_tuned_from_or_replaying_a_forgotten_dataset_are_marked(
    tmp_path: Path, store: JoinStore, registry: ModelRegistry, clock: Any, ev: Any
) -> None:
    """A version holds in its weights what its parent learned and what it replayed, not only its batch."""
    trainer = make(tmp_path, store, registry, clock)
    base = registry.state().production
    ds_a = await cut_sessions(trainer, ev, range(0, 1))  # the forgotten session's only answer
    clock.now += 1
    ds_b = await cut_sessions(trainer, ev, range(1, 3))
    trained = _candidate(tmp_path, registry, "a", parent_version=base, datasets=[ds_a])
    child = _candidate(tmp_path, registry, "child", parent_version=trained, datasets=[ds_b])
    grandchild = _candidate(tmp_path, registry, "grandchild", parent_version=child, datasets=[ds_b])
    replayed = _candidate(
        tmp_path,
        registry,
        "replay",
        parent_version=base,
        datasets=[ds_b],
        examples={"replayed": 1, "replayed_from": [ds_a]},
    )
    unrelated = _candidate(tmp_path, registry, "b", parent_version=base, datasets=[ds_b])

    report = await trainer.forget(SESSIONS[0], reason="ticket 3", caller="admin")

    [(old, new, _)] = report.datasets
    assert old == ds_a
    assert report.marked_versions == [trained, child, grandchild, replayed]
    for version in report.marked_versions:
        assert [(m["datasets"], m["replaced_by"]) for m in registry.marks(version)] == [([ds_a], [new])]
    assert registry.marks(unrelated) == [] and registry.marks(base or "") == []


def _staging(registry: ModelRegistry, name: str, age_s: float) -> Path:
    """What a dataset write killed between its files and its rename leaves (files read-only)."""
    folder = datasets.datasets_dir(registry.root) / name
    folder.mkdir(parents=True)
    (folder / "examples.jsonl").write_text('{"question": "my name is [NAME], what is item 1?"}\n')
    (folder / "examples.jsonl").chmod(0o444)
    then = time.time() - age_s
    os.utime(folder, (then, then))
    return folder


async def test_forget_and_the_scheduler_remove_what_a_killed_dataset_write_left(
    tmp_path: Path, store: JoinStore, registry: ModelRegistry, clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """No scan reads a staging folder, so no forget rewrites one: one older than the age guard goes
    whole; a younger one (a write may be in progress) is named in the audit and the log."""
    trainer = make(tmp_path, store, registry, clock)
    killed = _staging(registry, ".staging-ds-1-abc", 3600)
    writing = _staging(registry, ".staging-ds-2-def", 5)

    with caplog.at_level(logging.WARNING, logger="flywheel_trainer.trainer"):
        await trainer.forget(SESSIONS[0], reason="ticket 5", caller="admin")

    assert not killed.exists() and writing.exists()
    [record] = audit(tmp_path)
    assert (record["staging_removed"], record["staging_left"]) == (1, [writing.name])
    assert writing.name in caplog.text
    # The scheduler's next turn (the first comes at start) removes it once it is old enough to be a
    # killed write's.
    await trainer.tick()
    assert writing.exists()
    then = time.time() - 3600
    os.utime(writing, (then, then))
    await trainer.tick()
    assert not writing.exists()


async def test_forgetting_a_reviewer_rewrites_only_their_corrections_out_of_the_datasets(
    tmp_path: Path, store: JoinStore, registry: ModelRegistry, clock: Any, ev: Any
) -> None:
    """The visitor's answer the expert corrected and its low rating stay; the correction, and its text
    as the negative's preferred answer, go."""
    trainer = make(tmp_path, store, registry, clock)
    visitor, expert = SESSIONS[1], "e" * 32
    kind, role = events_pb2.FEEDBACK_KIND_CORRECTION, events_pb2.REVIEWER_ROLE_EXPERT
    store.ingest(
        [ev.interaction(1, session=visitor), ev.interaction(2, session=visitor)],
        [
            ev.rating(1, 1, session=visitor),
            FeedbackSignal("fc1", "q1", kind, 0, "The expert's answer.", role, expert),
            ev.correction(2),
        ],
    )
    cut = await trainer.cut("manual")
    assert cut is not None

    report = await trainer.forget(expert, reason="ticket 8", caller="admin")

    [(old, new, removed)] = report.datasets
    assert (old, removed) == (cut.dataset_id, 1)
    rewritten = datasets.load(registry.root, new)
    assert [e["id"] for e in rewritten.examples] == ["c-fc2"]
    assert [(n["id"], n["chosen"]) for n in rewritten.negatives] == [("n-q1", "")]
    assert b"expert's answer" not in b"".join(
        p.read_bytes() for p in (registry.root / "datasets").rglob("*") if p.is_file()
    )
    assert store.counts()["interactions"] == 2
