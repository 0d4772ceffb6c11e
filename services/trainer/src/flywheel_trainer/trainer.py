"""Batching and job scheduling: cut batches into datasets, launch at most K jobs, record outcomes,
announce candidates. Runs on the service's event loop; the consumer fills the store meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from flywheel_common.errors import FlywheelError, NotFound, Unavailable
from flywheel_common.kafka import EventProducer
from flywheel_common.pseudonym import tombstone
from flywheel_common.query_ids import query_id_session
from flywheel_common.redaction import Redactor
from flywheel_common.registry import ModelRegistry
from flywheel_proto.flywheel.events.v1 import events_pb2
from flywheel_trainer import datasets, metrics
from flywheel_trainer.launchers import JobLauncher, JobSpec, Outcome
from flywheel_trainer.results import read_result, registered_candidate
from flywheel_trainer.settings import TrainerSettings
from flywheel_trainer.store import (
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Cut,
    Job,
    JoinStore,
)

log = logging.getLogger(__name__)

# A queued job's reason while there is no production version; the API shows it to every caller.
WAITING_FOR_BASE = "waiting for a production model version to train from"

T = TypeVar("T")
_PURGE_INTERVAL_S = 3600.0


def _in_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """Runs `fn` on a daemon thread (not the default executor, which shutdown would wait for)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:
            result, error = None, exc
        # The loop may be gone by now (the service stopped while the job ran): nobody waits.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, future, result, error)

    threading.Thread(target=target, daemon=True, name="trainer-job-wait").start()
    return future


@dataclass(frozen=True)
class ForgetReport:
    """What forgetting a session did, as the ForgetSession RPC answers it."""

    interactions: int
    feedback: int
    examples: int
    # (old dataset id, new dataset id, examples and negatives removed)
    datasets: list[tuple[str, str, int]]
    marked_versions: list[str]
    audit_id: str


def _trained_on(lineages: dict[str, dict[str, Any]], version: str) -> set[str]:
    """Every dataset whose examples are in `version`'s weights: those its lineage names (the batch,
    those carried over, those replayed from) and, since a candidate is fine-tuned from its parent,
    those of every version it descends from.

    Not `job.data.learned_datasets`: that one leaves out replayed datasets on purpose (a replay is a
    sample, not a batch learned in full), and importing it would load the training data's
    tokenizer and retrieval code into the service.
    """
    found: set[str] = set()
    seen: set[str] = set()
    while version and version not in seen and version in lineages:
        seen.add(version)
        lineage = lineages[version]
        found.update(lineage.get("datasets") or [lineage.get("dataset_id", "")])
        found.update((lineage.get("examples") or {}).get("replayed_from") or [])
        version = str(lineage.get("parent_version") or "")
    found.discard("")
    return found


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class Trainer:
    """Owns the decisions: when a batch is cut, which job runs when, what its outcome was."""

    def __init__(
        self,
        settings: TrainerSettings,
        store: JoinStore,
        launcher: JobLauncher,
        registry: ModelRegistry,
        producer: EventProducer | None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.launcher = launcher
        self.registry = registry
        self.producer = producer
        self._clock = clock
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        self._last_purge = 0.0
        self._waiting_note = ""
        self.changed = asyncio.Event()
        # One announcer at a time: a job's watcher and the loop's tick both announce.
        self._announcing = asyncio.Lock()
        # A cut with its dataset's write, a retried write, and a forget run one at a time: a forget
        # that ran while a cut's dataset was being written would neither see the dataset on disk
        # nor keep the session's examples (read before the forget) out of it.
        self._batches = asyncio.Lock()
        # The last error of each dataset whose write failed (logged again only when it changes).
        self._write_errors: dict[str, str] = {}

    # ------------------------------------------------------------ privacy

    async def forget(self, session: str, *, reason: str, caller: str) -> ForgetReport:
        """Forgets one pseudonymised session everywhere the trainer keeps data (docs/security.md).

        Waits for a cut whose dataset is being written (and cuts wait for it), so a dataset is either
        on disk to be rewritten or written later from the store without the session; the consumer's
        events of the session are dropped from the moment the tombstone is committed.
        """
        async with self._batches:
            return await self._forget(session, reason=reason, caller=caller)

    async def _forget(self, session: str, *, reason: str, caller: str) -> ForgetReport:
        forgotten = await asyncio.to_thread(self.store.forget, session)
        ids, example_ids = forgotten.query_ids, forgotten.example_ids

        def drop(record: dict[str, Any]) -> bool:
            query_id = str(record.get("query_id", ""))
            return (
                query_id in ids
                or query_id_session(query_id) == session
                or str(record.get("id", "")) in example_ids
            )

        # Dataset writes killed before their rename: no scan reads them, so they go whole. One younger
        # than the age guard may be another process's write in progress: named in the audit instead.
        swept, young = await asyncio.to_thread(datasets.sweep_staging, self.settings.artifact_root)
        replaced: list[tuple[str, str, int]] = []
        # Every id a rewritten dataset's data has had (its own and those it replaces) -> its new id:
        # a version trained on any of them holds the session's data.
        replaced_by: dict[str, str] = {}
        found, damaged = await asyncio.to_thread(datasets.scan, self.settings.artifact_root)
        for dataset in found:
            made = datasets.without(dataset, drop)
            if made is None:
                continue
            new_id, files, manifest = made
            root = self.settings.artifact_root
            await asyncio.to_thread(datasets.write, root, new_id, files, manifest)
            removed = (
                len(dataset.examples) + len(dataset.negatives) - manifest["examples"] - manifest["negatives"]
            )
            with contextlib.suppress(KeyError):  # a dataset the store no longer knows (another store)
                self.store.replace_dataset(
                    dataset.dataset_id,
                    new_id,
                    examples=manifest["examples"],
                    negatives=manifest["negatives"],
                    sha256=manifest["sha256"],
                )
            await asyncio.to_thread(datasets.delete, root, dataset.dataset_id)
            replaced.append((dataset.dataset_id, new_id, removed))
            for old in [dataset.dataset_id, *dataset.manifest.get("replaces", [])]:
                replaced_by[old] = new_id
        marked = []
        versions = self.registry.list_versions()
        lineages = {v.version: v.manifest.get("lineage") or {} for v in versions}
        for version in versions:
            trained_on = _trained_on(lineages, version.version) & set(replaced_by)
            if trained_on:
                note = {
                    "kind": "forgotten_data",
                    "datasets": sorted(trained_on),
                    "replaced_by": sorted({replaced_by[old] for old in trained_on}),
                    "note": "trained on data since forgotten: retrain from the replacements to be rid of it",
                }
                self.registry.mark(version.version, note)
                marked.append(version.version)
        audit_id = uuid.uuid4().hex
        record = {
            "audit_id": audit_id,
            "action": "forget_session",
            "at": self._clock(),
            # Not the pseudonym: the audit proves the forget without keeping what was forgotten.
            "session_tombstone": tombstone(session),
            "caller": caller,
            # Free text, likely naming the requester: kept redacted like every text the trainer stores.
            "reason": Redactor(presidio=False).redact(reason).text,
            "removed": {
                "interactions": forgotten.interactions,
                "feedback": forgotten.feedback,
                "examples": forgotten.examples,
            },
            "datasets": [{"old": o, "new": n, "removed": r} for o, n, r in replaced],
            "marked_versions": marked,
            # Folders that fail their hash checks were not searched: they may still hold the session.
            "damaged_datasets": damaged,
            # Unfinished dataset writes removed, and those too recent to remove (not searched).
            "staging_removed": len(swept),
            "staging_left": young,
        }
        await asyncio.to_thread(self._audit, record)
        if damaged:
            log.warning(
                "forget (audit %s) could not check %d damaged datasets: %s",
                audit_id,
                len(damaged),
                ", ".join(damaged),
            )
        if young:
            log.warning(
                "forget (audit %s) left %d dataset staging folders younger than %d s (a write may be "
                "in progress; forget again later to remove them): %s",
                audit_id,
                len(young),
                datasets.STAGING_MAX_AGE_S,
                ", ".join(young),
            )
        # Last: the rows are gone and the datasets rewritten even when this fails (then the RPC
        # fails, and the same forget again finishes the job).
        await asyncio.to_thread(self.store.vacuum)
        metrics.FORGOTTEN.inc()
        log.info("forgot a session (audit %s)", audit_id, extra={"audit": record})
        report = ForgetReport(
            forgotten.interactions, forgotten.feedback, forgotten.examples, replaced, marked, audit_id
        )
        return report

    def _audit(self, record: dict[str, Any]) -> None:
        """Appends an audit record durably (a JSON line in the trainer's data folder)."""
        path = self.settings.data_dir / "audit.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # ------------------------------------------------------------ batches

    def due(self) -> str | None:
        """Why a batch should be cut now ("size" or "time"), or None."""
        batch = self.settings.batch
        pending = self.store.pending()
        metrics.EXAMPLES_PENDING.set(pending.examples)
        if pending.examples >= batch.max_examples:
            return "size"
        if (
            pending.examples >= batch.min_examples
            and pending.oldest_received_at is not None
            and self._clock() - pending.oldest_received_at >= batch.max_wait_s
        ):
            return "time"
        return None

    async def cut(self, reason: str) -> Cut | None:
        """Cuts a batch of the oldest waiting examples and writes its dataset; None when none wait.

        The cut stands when the write fails (a full disk): every tick tries the write again, and the
        job waits for it.
        """
        async with self._batches:
            cut = self.store.cut(max_examples=self.settings.batch.max_examples, reason=reason)
            if cut is None:
                return None
            metrics.BATCH_EXAMPLES.observe(cut.examples)
            metrics.JOBS.labels(QUEUED).inc()
            log.info(
                "cut batch %s (%s): %d examples, %d negatives; job %s queued",
                cut.dataset_id,
                reason,
                cut.examples,
                cut.negatives,
                cut.job_id,
                extra={"dataset_id": cut.dataset_id, "job_id": cut.job_id},
            )
            await self._try_write(cut.dataset_id)
        self.changed.set()
        return cut

    async def write_pending(self) -> None:
        """Writes the datasets cut but not written yet (a full disk, a crash in between), oldest first."""
        if not self.store.unwritten_datasets():
            return  # the usual turn: no need to wait for a forget that holds the lock
        async with self._batches:
            for dataset_id in self.store.unwritten_datasets():
                if await self._try_write(dataset_id):
                    log.info("wrote dataset %s, left unwritten earlier", dataset_id)

    async def _try_write(self, dataset_id: str) -> bool:
        """Writes a dataset; a failure is logged (once per error) and counted, not raised."""
        try:
            await self._write_dataset(dataset_id)
        except Exception as exc:
            metrics.DATASET_WRITE_FAILURES.inc()
            error = f"{type(exc).__name__}: {exc}"
            if self._write_errors.get(dataset_id) != error:
                self._write_errors[dataset_id] = error
                log.warning(
                    "dataset %s not written (tried again every turn; its job waits): %s",
                    dataset_id,
                    error,
                    extra={"dataset_id": dataset_id},
                )
            return False
        self._write_errors.pop(dataset_id, None)
        return True

    async def cut_by_admin(self, caller: str) -> Cut | None:
        """An admin's batch, cut now whatever the schedule says, with an audit record naming the
        caller (a prefix of the token's hash) and what it started."""
        cut = await self.cut("manual")
        record = {
            "audit_id": uuid.uuid4().hex,
            "action": "trigger_batch",
            "at": self._clock(),
            "caller": caller,
            "dataset_id": cut.dataset_id if cut else None,
            "job_id": cut.job_id if cut else None,
        }
        await asyncio.to_thread(self._audit, record)
        return cut

    async def _write_dataset(self, dataset_id: str) -> None:
        row = self.store.dataset(dataset_id)
        if row is None:
            raise NotFound(f"no dataset {dataset_id}")
        rows = self.store.dataset_rows(dataset_id)
        files, manifest = datasets.build(dataset_id, rows, created_at=row["created_at"], reason=row["reason"])
        await asyncio.to_thread(datasets.write, self.settings.artifact_root, dataset_id, files, manifest)
        self.store.mark_written(dataset_id, manifest["sha256"])

    # ------------------------------------------------------------ jobs

    def _running(self) -> int:
        return len(self.store.jobs(states=[RUNNING]))

    def _base_version(self) -> str | None:
        return self.settings.jobs.base_version or self.registry.state().production

    async def launch_queued(self) -> None:
        """Launches queued jobs, oldest first, while fewer than K run."""
        queued = [
            j
            for j in reversed(self.store.jobs(states=[QUEUED]))
            if (self.store.dataset(j.dataset_id) or {}).get("written")
        ]
        for job in queued:
            if self._stopping or self._running() >= self.settings.jobs.max_concurrent:
                return
            base = self._base_version()
            if base is None:
                note = WAITING_FOR_BASE
                if self._waiting_note != note:
                    log.warning("job %s %s", job.job_id, note)
                    self._waiting_note = note
                self.store.update_job(job.job_id, reason=note)
                return
            await self._launch(job, base)

    async def _launch(self, job: Job, base: str) -> None:
        result = read_result(self.settings.artifact_root, job.job_id)
        if result is not None:
            # It ran already: the trainer stopped between launching it and recording that.
            log.warning("job %s has a result already: recording it, not running it again", job.job_id)
            job = self.store.update_job(
                job.job_id, base_version=str(result.get("base_version") or base), launcher=self.launcher.name
            )
            self._finish(job, "", Outcome(None, "it ran before a trainer restart"))
            return
        spec = JobSpec(job.job_id, job.dataset_id, base)
        try:
            handle = await asyncio.to_thread(self.launcher.launch, spec)
        except Exception as exc:  # the launcher could not start it: the job fails, the batch is not retried
            log.exception("launching job %s failed", job.job_id)
            self._finish(job, "", Outcome(False, f"launch failed: {type(exc).__name__}: {exc}"))
            return
        self.store.update_job(
            job.job_id,
            state=RUNNING,
            reason="",
            base_version=base,
            launcher=self.launcher.name,
            handle=handle,
            started_at=self._clock(),
        )
        metrics.JOBS.labels("launched").inc()
        self._watch(job.job_id, handle)

    def _watch(self, job_id: str, handle: str) -> None:
        async def watch() -> None:
            try:
                try:
                    outcome = await _in_thread(lambda: self.launcher.wait(handle))
                except Exception as exc:
                    log.exception("watching job %s failed", job_id)
                    outcome = Outcome(False, f"lost track of the job: {type(exc).__name__}: {exc}")
                job = self.store.job(job_id)
                if job is not None and job.state == RUNNING:
                    self._finish(job, handle, outcome)
                    await self.announce_candidates()
            except Exception:  # the tick announces what this could not
                log.exception("after job %s ended", job_id)
            finally:
                self._watchers.pop(job_id, None)
                self.changed.set()

        self._watchers[job_id] = asyncio.create_task(watch(), name=f"watch-{job_id}")

    def _finish(self, job: Job, handle: str, outcome: Outcome) -> None:
        """Records a job's end; when that fails (its result or the registry unreadable) the job is
        recorded failed, so it never stays running and holds one of the K places."""
        try:
            self._record_end(job, handle, outcome)
        except Exception as exc:
            log.exception("recording the end of job %s failed: it is recorded failed", job.job_id)
            try:
                self.store.update_job(
                    job.job_id,
                    state=FAILED,
                    reason=f"its end could not be recorded: {type(exc).__name__}: {exc}"[:2000],
                    finished_at=self._clock(),
                    handle=handle or job.handle,
                )
            except Exception:
                log.exception("job %s could not be recorded failed either", job.job_id)
                return
            metrics.JOBS.labels(FAILED).inc()
        # A job killed outright (SIGKILL, the machine's OOM killer) leaves its scratch folder behind.
        try:
            self.launcher.clean_up(job.job_id)
        except Exception:
            log.exception("removing what job %s left failed", job.job_id)

    def _record_end(self, job: Job, handle: str, outcome: Outcome) -> None:
        """Records a job's end from the launcher's outcome and the job's own result file."""
        result = read_result(self.settings.artifact_root, job.job_id) or {}
        now = self._clock()
        candidate = str(result.get("candidate_version") or "")
        ok = result.get("status") == SUCCEEDED and bool(candidate)
        reason = ""
        if ok:
            try:
                self.registry.get(candidate)
            except FlywheelError:
                ok, reason = False, f"the job reported {candidate}, which is not in the registry"
        elif (registered := registered_candidate(self.registry, job.job_id)) is not None:
            # A registered candidate is the job's success, even if the process died after
            # registering and before its result said so.
            ok, candidate = True, registered.version
            log.warning(
                "job %s left no successful result (%s) but registered candidate %s",
                job.job_id,
                result.get("reason") or outcome.reason or "none",
                candidate,
                extra={"job_id": job.job_id},
            )
        else:
            reason = str(result.get("reason") or outcome.reason or "the job wrote no result")
            if outcome.reason and outcome.reason not in reason:
                reason = f"{reason} ({outcome.reason})"
        state = SUCCEEDED if ok else FAILED
        self.store.update_job(
            job.job_id,
            state=state,
            reason=reason,
            candidate_version=candidate if ok else "",
            finished_at=now,
            handle=handle or job.handle,
        )
        metrics.JOBS.labels(state).inc()
        if job.started_at:
            metrics.JOB_DURATION.labels(state).observe(now - job.started_at)
        losses = result.get("epoch_losses") or []
        if losses:
            metrics.TRAINING_LOSS.labels("first").set(float(losses[0]))
            metrics.TRAINING_LOSS.labels("last").set(float(losses[-1]))
        log.log(
            logging.INFO if ok else logging.WARNING,
            "job %s %s%s",
            job.job_id,
            state,
            f": candidate {candidate}" if ok else f": {reason}",
            extra={"job_id": job.job_id, "dataset_id": job.dataset_id},
        )

    async def announce_candidates(self) -> None:
        """Emits ModelCandidate for succeeded jobs whose event is not out yet (retried until acked)."""
        if self.producer is None:
            return
        async with self._announcing:
            await self._announce()

    async def _announce(self) -> None:
        assert self.producer is not None
        for job in self.store.jobs(states=[SUCCEEDED]):
            if job.event_emitted:
                continue
            created = Timestamp()
            created.FromSeconds(int(job.finished_at or self._clock()))
            event = events_pb2.ModelCandidate(
                version=job.candidate_version,
                parent_version=job.base_version,
                dataset_id=job.dataset_id,
                job_id=job.job_id,
                created_at=created,
            )
            try:
                if not self.producer.connected:
                    await asyncio.to_thread(self.producer.connect, [self.settings.kafka.topics.candidates])
                await self.producer.produce(
                    self.settings.kafka.topics.candidates, job.candidate_version, event
                )
            except Exception as exc:  # Kafka away: the next turn of the loop tries again
                log.warning("ModelCandidate %s not emitted yet: %s", job.candidate_version, exc)
                return
            self.store.update_job(job.job_id, event_emitted=True)
            metrics.CANDIDATES.inc()
            log.info(
                "announced candidate %s (parent %s, dataset %s)",
                job.candidate_version,
                job.base_version,
                job.dataset_id,
                extra={"job_id": job.job_id},
            )

    # ------------------------------------------------------------ lifecycle

    async def recover(self) -> None:
        """After a restart: write datasets a crash left unwritten, adopt jobs that were running.

        Nothing here stops the start: a dataset that cannot be written yet (a full disk) is tried
        again every tick, and a job whose end cannot be read is recorded failed.
        """
        await self.write_pending()
        for job in self.store.jobs(states=[RUNNING]):
            if job.launcher != self.launcher.name or not job.handle:
                self._finish(job, job.handle, Outcome(False, f"launched by {job.launcher or 'nothing'}"))
                continue
            log.info("adopting running job %s (%s)", job.job_id, job.handle)
            self._watch(job.job_id, job.handle)

    def _sweep_staging(self) -> None:
        """Removes what killed dataset writes left (examples no forget would find); never raises."""
        try:
            swept, _ = datasets.sweep_staging(self.settings.artifact_root)
        except OSError as exc:
            log.warning("dataset staging folders not swept: %s", exc)
            return
        if swept:
            log.warning("removed %d dataset staging folders a killed write left", len(swept))

    async def tick(self) -> None:
        """One turn: write datasets left unwritten, remove what killed writes left, cut a batch when
        due, launch what may run, announce, purge, update gauges."""
        await self.write_pending()
        self._sweep_staging()
        reason = self.due()
        if reason is not None:
            await self.cut(reason)
        await self.launch_queued()
        await self.announce_candidates()
        now = self._clock()
        if now - self._last_purge >= _PURGE_INTERVAL_S:
            self._last_purge = now
            purged = self.store.purge(self.settings.retention_s)
            metrics.FEEDBACK_UNJOINED.inc(purged["unjoined"])
            if any(purged.values()):
                log.info("retention purge: %s", purged)
        for state in (QUEUED, RUNNING):
            metrics.JOBS_CURRENT.labels(state).set(len(self.store.jobs(states=[state])))

    async def run(self) -> None:
        """Ticks until cancelled; a job ending or a manual cut wakes it early."""
        interval = self.settings.batch.check_interval_s
        while True:
            try:
                await self.tick()
            except Unavailable as exc:
                log.warning("trainer tick: %s", exc)
            except Exception:
                log.exception("trainer tick failed")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), interval)

    async def shutdown(self) -> None:
        """Stops watching; local jobs are stopped (and fail) when the settings say so."""
        self._stopping = True
        for task in list(self._watchers.values()):
            task.cancel()
        for task in list(self._watchers.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._watchers.clear()
        if self.launcher.name == "local" and self.settings.jobs.local_stop_on_shutdown:
            for job in self.store.jobs(states=[RUNNING]):
                await asyncio.to_thread(self.launcher.stop, job.handle)
                self._finish(job, job.handle, Outcome(False, "stopped: the trainer shut down"))
