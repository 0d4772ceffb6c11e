"""Batching and scheduling with a fake launcher: N/T/M, at most K jobs, one job per batch, outcomes,
announcements, recovery after a restart."""

from __future__ import annotations

import asyncio
import errno
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from flywheel_common.registry import ModelRegistry
from flywheel_trainer import datasets
from flywheel_trainer import trainer as trainer_module
from flywheel_trainer.launchers import JobLauncher, JobSpec, LocalJobLauncher, Outcome
from flywheel_trainer.results import result_path, write_result
from flywheel_trainer.settings import BatchSettings, JobsSettings, TrainerSettings
from flywheel_trainer.store import FAILED, QUEUED, RUNNING, SUCCEEDED, JoinStore
from flywheel_trainer.trainer import Trainer


class FakeLauncher(JobLauncher):
    """Jobs end when the test says so, writing the result a real job would."""

    def __init__(self, registry: ModelRegistry, name: str = "fake") -> None:
        self.name = name
        self.registry = registry
        self.launched: list[JobSpec] = []
        self.waited: list[str] = []
        self.stopped: list[str] = []
        self._done: dict[str, threading.Event] = {}
        self._outcome: dict[str, Outcome] = {}

    def launch(self, spec: JobSpec) -> str:
        self.launched.append(spec)
        self._done.setdefault(spec.job_id, threading.Event())
        return spec.job_id

    def wait(self, handle: str) -> Outcome:
        self.waited.append(handle)
        self._done.setdefault(handle, threading.Event()).wait(30)
        return self._outcome.get(handle, Outcome(True))

    def stop(self, handle: str) -> None:
        self.stopped.append(handle)
        self.end(handle, ok=False, reason="stopped")

    def end(self, job_id: str, *, ok: bool, reason: str = "") -> None:
        root = self.registry.root
        if ok:
            model = root.parent / f"model-{job_id}"
            model.mkdir(exist_ok=True)
            (model / "model.onnx").write_bytes(b"x")
            version = self.registry.register(model, kind="candidate").version
            result = {"status": "succeeded", "candidate_version": version, "epoch_losses": [2.0, 1.0]}
        else:
            result = {"status": "failed", "reason": reason}
        write_result(root, job_id, result)
        self._outcome[job_id] = Outcome(ok, "" if ok else "exit code 1")
        self._done.setdefault(job_id, threading.Event()).set()


class FakeProducer:
    """Records produced events; can be made to fail."""

    def __init__(self) -> None:
        self.connected = True
        self.events: list[tuple[str, str, Any]] = []
        self.fail = False

    def connect(self, topics: Any = ()) -> None:
        pass

    async def produce(self, topic: str, key: str, message: Any) -> None:
        await asyncio.sleep(0.01)  # the broker's round trip: other coroutines run meanwhile
        if self.fail:
            raise RuntimeError("kafka down")
        self.events.append((topic, key, message))


def make(
    tmp_path: Path, store: JoinStore, registry: ModelRegistry, clock: Any, **batch: Any
) -> tuple[Trainer, FakeLauncher, FakeProducer]:
    settings = TrainerSettings(
        artifact_root=registry.root,
        data_dir=tmp_path / "trainer",
        batch=BatchSettings(**{"max_examples": 3, "min_examples": 2, "max_wait_s": 60, **batch}),
        jobs=JobsSettings(max_concurrent=1),
    )
    launcher = FakeLauncher(registry)
    producer = FakeProducer()
    return Trainer(settings, store, launcher, registry, producer, clock=clock), launcher, producer  # type: ignore[arg-type]


def feed(store: JoinStore, ev: Any, ids: range) -> None:
    for i in ids:
        store.ingest([ev.interaction(i)], [ev.correction(i)])


async def settle(trainer: Trainer, predicate: Any) -> None:
    async with asyncio.timeout(10):
        while not predicate():
            await trainer.tick()
            await asyncio.sleep(0.02)


async def test_batches_are_cut_at_n_or_after_t_with_m(
    tmp_path: Path, store: JoinStore, registry: ModelRegistry, clock: Any, ev: Any
) -> None:
    trainer, _, _ = make(tmp_path, store, registry, clock)
    feed(store, ev, range(1))
    assert trainer.due() is None
    clock.now += 120
    assert trainer.due() is None  # waited long enough, but fewer than M
    feed(store, ev, range(1, 2))
    assert trainer.due() == "time"
    feed(store, ev, range(2, 3))
    assert trainer.due() == "size"
    cut = await trainer.cut("size")
    assert cut is not None and cut.examples == 3
    loaded = datasets.load(registry.root, cut.dataset_id)
    assert loaded.manifest["reason"] == "size"
    assert loaded.manifest["example_ids"] == ["c-fc0", "c-fc1", "c-fc2"]
    assert store.dataset(cut.dataset_id)["written"] == 1  # type: ignore[index]


async def test_at_most_k_jobs_run_and_each_batch_is_trained_once(
    tmp_path: Path, store: JoinStore, registry: ModelRegistry, clock: Any, ev: Any
) -> None:
    trainer, launcher, producer = make(tmp_path, store, registry, clock)
    cuts = []
    for start in (0, 3, 6):
        feed(store, ev, range(start, start + 3))
        cuts.append(await trainer.cut("size"))
    await trainer.launch_queued()
    assert [s.dataset_id for s in launcher.launched] == [cuts[0].dataset_id]
    assert launcher.launched[0].base_version == "v1"
    assert [j.state for j in reversed(store.jobs())] == [RUNNING, QUEUED, QUEUED]
    for i in range(3):
        await settle(trainer, lambda i=i: store.job(cuts[i].job_id).state == RUNNING)
        launcher.end(cuts[i].job_id, ok=i != 1, reason="boom")
        await settle(trainer, lambda i=i: store.job(cuts[i].job_id).state not in (QUEUED, RUNNING))
    await settle(trainer, lambda: len(producer.events) == 2)
    for _ in range(3):
        await trainer.tick()
    assert [s.dataset_id for s in launcher.launched] == [c.dataset_id for c in cuts]
    states = {j.dataset_id: j for j in store.jobs()}
    assert states[cuts[0].dataset_id].state == SUCCEEDED
    assert states[cuts[0].dataset_id].candidate_version == "v2"
    assert states[cuts[1].dataset_id].state == FAILED
    assert "boom" in states[cuts[1].dataset_id].reason
    assert states[cuts[2].dataset_id].candidate_version == "v3"
    announced = [(m.version, m.parent_version, m.dataset_id, m.job_id) for _, _, m in producer.events]
    assert announced == [
        ("v2", "v1", cuts[0].dataset_id, cuts[0].job_id),
        ("v3", "v1", cuts[2].dataset_id, cuts[2].job_id),
    ]


async def succeeded_while_kafka_is_down(
    tmp_path: Path, store: JoinStore, registry: ModelRegistry, clock: Any, ev: Any
) -> tuple[Trainer, FakeProducer, str]:
    """A job that succeeded while every announcement failed; Kafka takes them again afterwards."""
    trainer, launcher, producer = make(tmp_path, store, registry, clock)
    producer.fail = True
    feed(store, ev, range(3))
    cut = await trainer.cut("size")
    assert cut is not None
    await trainer.launch_queued()
    launcher.end(cut.job_id, ok=True)
    await settle(trainer, lambda: store.job(cut.job_id).state == SUCCEEDED)
    assert not store.job(cut.job_id).event_emitted  # type: ignore[union-attr]
    producer.fail = False
    return trainer, producer, cut.job_id


async def test_announcements_are_retried_until_kafka_takes_them(
    tmp_path: Path, store: JoinStore, registry: ModelRegistry, clock: Any, ev: Any
) -> None:
    trainer, producer, job_id = await succeeded_while_kafka_is_down(tmp_path, store, registry, clock, ev)
    await trainer.tick()
    await trainer.tick()
    assert len(producer.events) == 1 and store.job(job_id).event_emitted  # type: ignore[union-attr]


async def test_concurrent_announcements_emit_once(
    tmp_path: Path, store: JoinStore, registry: ModelRegistry, clock: Any, ev: Any
) -> None:
    trainer, producer, _ = await succeeded_while_kafka_is_down(tmp_path, store, registry, clock, ev)
    await asyncio.gather(*(trainer.announce_candidates() for _ in range(3)))
    assert len(producer.events) == 1


async def test_a_job_claiming_an_unregistered_candidate_fails(
    tmp_path: Path, store: JoinStore, registry: ModelRegistry, clock: Any, ev: Any
) -> None:
    trainer, launcher, _ = make(tmp_path, store, registry, clock)
    feed(store, ev, range(3))
    cut = await trainer.cut("size")
    assert cut is not None
    await trainer.launch_queued()
    write_result(registry.root, cut.job_id, {"status": "succeeded", "candidate_version": "v99"})
    launcher._done[cut.job_id].set()
    await settle(trainer, lambda: store.job(cut.job_id).state == FAILED)
    assert "v99" in store.job(cut.job_id).reason  # type: ignore[union-attr]


async def test_jobs_wait_for_a_production_version(
    tmp_path: Path, store: JoinStore, clock: Any, ev: Any
) -> None:
    registry = ModelRegistry(tmp_path / "empty-artifacts")
    trainer, launcher, _ = make(tmp_path, store, registry, clock)
    feed(store, ev, range(3))
    cut = await trainer.cut("size")
    assert cut is not None
    await trainer.tick()
    job = store.job(cut.job_id)
    assert job is not None and job.state == QUEUED and "production" in job.reason
    assert launcher.launched == []


async def test_a_restarted_trainer_adopts_running_jobs_and_writes_pending_datasets(
    tmp_path: Path, store: JoinStore, registry: ModelRegistry, clock: Any, ev: Any
) -> None:
    trainer, launcher, _ = make(tmp_path, store, registry, clock)
    feed(store, ev, range(3))
    cut = await trainer.cut("size")
    assert cut is not None
    await trainer.launch_queued()
    await trainer.shutdown()  # the fake launcher is not "local": its job keeps running
    assert store.job(cut.job_id).state == RUNNING  # type: ignore[union-attr]
    # A crash between cutting a batch and writing its dataset:
    feed(store, ev, range(3, 6))
    crashed = store.cut(max_examples=3, reason="size")
    assert crashed is not None and crashed.dataset_id not in {
        p.name for p in datasets.datasets_dir(registry.root).iterdir()
    }

    again, relauncher, _ = make(tmp_path, store, registry, clock)
    relauncher._done = launcher._done
    await again.recover()
    await settle(again, lambda: relauncher.waited)
    assert relauncher.waited == [cut.job_id] and relauncher.launched == []
    datasets.load(registry.root, crashed.dataset_id)
    relauncher.end(cut.job_id, ok=True)
    await settle(again, lambda: store.job(cut.job_id).state == SUCCEEDED)
    await settle(again, lambda: store.job(crashed.job_id).state == RUNNING)
    assert [s.job_id for s in relauncher.launched] == [crashed.job_id]
    relauncher.end(crashed.job_id, ok=True)
    await settle(again, lambda: store.job(crashed.job_id).state == SUCCEEDED)


async def test_shutdown_stops_local_jobs(
    tmp_path: Path, store: JoinStore, registry: ModelRegistry, clock: Any, ev: Any
) -> None:
    trainer, launcher, _ = make(tmp_path, store, registry, clock)
    launcher.name = "local"
    feed(store, ev, range(3))
    cut = await trainer.cut("size")
    assert cut is not None
    await trainer.launch_queued()
    await trainer.shutdown()
    job = store.job(cut.job_id)
    assert launcher.stopped == [cut.job_id]
    assert job is not None and job.state == FAILED and "shut down" in job.reason


# A job killed outright (SIGKILL) after it filled its scratch folder: its own clean-up never runs.
KILLED_JOB = (
    "import os, signal, sys; from pathlib import Path; "
    "job = sys.argv[sys.argv.index('--job-id') + 1]; "
    "scratch = Path(os.environ['FLYWHEEL_TRAINER_JOB_SCRATCH_DIR']) / job; "
    "(scratch / 'hf').mkdir(parents=True); (scratch / 'hf' / 'model.safetensors').write_bytes(b'w'); "
    "os.kill(os.getpid(), signal.SIGKILL)"
)


async def test_the_scratch_a_killed_local_job_left_is_removed_when_its_end_is_recorded(
    tmp_path: Path,
    store: JoinStore,
    registry: ModelRegistry,
    clock: Any,
    ev: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FLYWHEEL_TRAINER_JOB_SCRATCH_DIR", raising=False)
    settings = TrainerSettings(
        artifact_root=registry.root,
        data_dir=tmp_path / "trainer",
        batch=BatchSettings(max_examples=3, min_examples=2, max_wait_s=60),
        jobs=JobsSettings(max_concurrent=1, launcher="local", local_command=["{python}", "-c", KILLED_JOB]),
    )
    launcher = LocalJobLauncher(settings)
    trainer = Trainer(settings, store, launcher, registry, FakeProducer(), clock=clock)  # type: ignore[arg-type]
    feed(store, ev, range(3))
    cut = await trainer.cut("size")
    assert cut is not None
    await settle(trainer, lambda: store.job(cut.job_id).state == FAILED)  # type: ignore[union-attr]
    assert "SIGKILL" in store.job(cut.job_id).reason  # type: ignore[union-attr]
    assert not (tmp_path / "trainer" / "scratch" / cut.job_id).exists()
    await trainer.shutdown()


async def test_every_recorded_end_asks_the_launcher_to_clean_up(
    tmp_path: Path, store: JoinStore, registry: ModelRegistry, clock: Any, ev: Any
) -> None:
    trainer, launcher, _ = make(tmp_path, store, registry, clock)
    cleaned: list[str] = []
    launcher.clean_up = cleaned.append  # type: ignore[method-assign]
    feed(store, ev, range(3))
    cut = await trainer.cut("size")
    assert cut is not None
    await trainer.launch_queued()
    launcher.end(cut.job_id, ok=False, reason="boom")
    await settle(trainer, lambda: store.job(cut.job_id).state == FAILED)  # type: ignore[union-attr]
    assert cleaned == [cut.job_id]


def write_failures() -> float:
    return REGISTRY.get_sample_value("flywheel_trainer_dataset_write_failures_total") or 0.0


async def test_a_dataset_a_full_disk_refused_is_written_on_a_later_turn(
    tmp_path: Path,
    store: JoinStore,
    registry: ModelRegistry,
    clock: Any,
    ev: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trainer, _, _ = make(tmp_path, store, registry, clock)
    write = datasets.write

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datasets, "write", full)
    failures = write_failures()
    feed(store, ev, range(3))
    cut = await trainer.cut("size")  # the cut stands; its write waits for room
    assert cut is not None and store.unwritten_datasets() == [cut.dataset_id]
    # A restart while the disk is still full starts all the same.
    again, relauncher, _ = make(tmp_path, store, registry, clock)
    await again.recover()
    await again.tick()
    assert store.job(cut.job_id).state == QUEUED and relauncher.launched == []  # type: ignore[union-attr]
    assert write_failures() - failures == 3

    monkeypatch.setattr(datasets, "write", write)
    await again.tick()
    assert store.unwritten_datasets() == []
    datasets.load(registry.root, cut.dataset_id)
    assert [s.job_id for s in relauncher.launched] == [cut.job_id]


async def test_a_job_that_died_after_registering_succeeds_with_its_candidate(
    tmp_path: Path, store: JoinStore, registry: ModelRegistry, clock: Any, ev: Any
) -> None:
    trainer, launcher, producer = make(tmp_path, store, registry, clock)
    feed(store, ev, range(3))
    cut = await trainer.cut("size")
    assert cut is not None
    await trainer.launch_queued()
    model = tmp_path / "candidate"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"x")
    registry.register(model, kind="candidate", metadata={"lineage": {"job_id": "job-other"}})
    mine = registry.register(model, kind="candidate", metadata={"lineage": {"job_id": cut.job_id}})
    # Killed after registering, before its result: no result file.
    launcher._outcome[cut.job_id] = Outcome(False, "killed by SIGKILL")
    launcher._done[cut.job_id].set()
    await settle(trainer, lambda: store.job(cut.job_id).state != RUNNING)
    job = store.job(cut.job_id)
    assert job is not None and (job.state, job.candidate_version) == (SUCCEEDED, mine.version)
    await settle(trainer, lambda: producer.events)
    assert [(m.version, m.job_id) for _, _, m in producer.events] == [(mine.version, cut.job_id)]


async def test_an_unreadable_result_fails_the_job_and_frees_its_place(
    tmp_path: Path, store: JoinStore, registry: ModelRegistry, clock: Any, ev: Any
) -> None:
    trainer, launcher, _ = make(tmp_path, store, registry, clock)
    cuts = []
    for start in (0, 3):
        feed(store, ev, range(start, start + 3))
        cuts.append(await trainer.cut("size"))
    first, second = (c.job_id for c in cuts if c is not None)
    await trainer.launch_queued()
    path = result_path(registry.root, first)
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"status": "succeeded", "reason": "\xff\xfe"}')  # not UTF-8
    launcher._done[first].set()
    await settle(trainer, lambda: store.job(first).state == FAILED)
    assert "unreadable result file: UnicodeDecodeError" in store.job(first).reason  # type: ignore[union-attr]
    await settle(trainer, lambda: store.job(second).state == RUNNING)  # K = 1: the place is free


async def test_a_job_whose_end_cannot_be_recorded_fails_and_the_start_goes_on(
    tmp_path: Path,
    store: JoinStore,
    registry: ModelRegistry,
    clock: Any,
    ev: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unreadable: set[str] = set()

    def read_result(root: Path, job_id: str) -> None:
        if job_id in unreadable:
            raise RuntimeError("the artifact volume is gone")

    monkeypatch.setattr(trainer_module, "read_result", read_result)
    trainer, launcher, _ = make(tmp_path, store, registry, clock)
    cuts = []
    for start in (0, 3):
        feed(store, ev, range(start, start + 3))
        cuts.append(await trainer.cut("size"))
    first, second = (c.job_id for c in cuts if c is not None)
    await trainer.launch_queued()
    unreadable.add(first)
    launcher._done[first].set()
    await settle(trainer, lambda: store.job(first).state == FAILED)
    assert "could not be recorded: RuntimeError" in store.job(first).reason  # type: ignore[union-attr]
    # A restart finds the second job running under a launcher it does not have: recorded, not raised.
    await settle(trainer, lambda: store.job(second).state == RUNNING)
    unreadable.add(second)
    await trainer.shutdown()
    again, _, _ = make(tmp_path, store, registry, clock)
    again.launcher.name = "other"
    await again.recover()
    assert store.job(second).state == FAILED  # type: ignore[union-attr]


async def test_a_queued_job_with_a_result_is_recorded_not_run_again(
    tmp_path: Path, store: JoinStore, registry: ModelRegistry, clock: Any, ev: Any
) -> None:
    trainer, launcher, producer = make(tmp_path, store, registry, clock)
    feed(store, ev, range(3))
    cut = await trainer.cut("size")
    assert cut is not None
    # Launched, and ended, by a trainer that stopped before recording the launch.
    launcher.end(cut.job_id, ok=True)
    await trainer.tick()
    job = store.job(cut.job_id)
    assert launcher.launched == []
    assert job is not None and (job.state, job.candidate_version, job.base_version) == (SUCCEEDED, "v2", "v1")
    await settle(trainer, lambda: producer.events)


@pytest.fixture(autouse=True)
def _quiet_metrics() -> None:
    """Metrics are process-global; nothing to reset, the tests only look at the store."""
