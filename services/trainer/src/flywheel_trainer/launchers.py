"""Job launchers behind one interface: a local subprocess, or a Kubernetes Job from the chart's template.

Both run the same entrypoint (`python -m flywheel_trainer.job --dataset ... --base-version ...
--job-id ...`); the job writes its result file to the artifact store, which the trainer reads
once the launcher reports the end.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flywheel_trainer.settings import TrainerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobSpec:
    """What one training job does."""

    job_id: str
    dataset_id: str
    base_version: str

    def args(self) -> list[str]:
        return ["--dataset", self.dataset_id, "--base-version", self.base_version, "--job-id", self.job_id]


@dataclass(frozen=True)
class Outcome:
    """How a job ended as its launcher saw it; `succeeded` None when the launcher cannot tell
    (an adopted process whose exit code is lost): the result file decides."""

    succeeded: bool | None
    reason: str = ""


class JobLauncher(ABC):
    """Starts training jobs, waits for them, stops them."""

    name: str = ""

    @abstractmethod
    def launch(self, spec: JobSpec) -> str:
        """Starts the job; returns a handle that `wait` and `stop` accept (also after a restart)."""

    @abstractmethod
    def wait(self, handle: str) -> Outcome:
        """Blocks until the job ended (run it on a thread)."""

    @abstractmethod
    def stop(self, handle: str) -> None:
        """Stops a running job (nothing happens when it already ended)."""

    def clean_up(self, job_id: str) -> None:
        """Removes what an ended job left where the trainer can reach it; nothing by default (a
        Kubernetes Job's scratch space ends with its pod)."""
        return None


# ---------------------------------------------------------------- local


class LocalJobLauncher(JobLauncher):
    """Runs each job as a subprocess in its own session, logging to `<data_dir>/jobs/<job_id>.log`.

    Handles are `<pid>/<job id>`, so a restarted trainer can adopt a job that outlived it (and does
    not mistake another process that got the same pid for it).
    """

    name = "local"

    def __init__(self, settings: TrainerSettings, *, stop_grace_s: float = 10.0) -> None:
        command = settings.jobs.local_command
        self.command = [sys.executable if part == "{python}" else part for part in command]
        self.logs_dir = settings.data_dir / "jobs"
        self.env = {
            "FLYWHEEL_TRAINER_JOB_ARTIFACT_ROOT": str(settings.artifact_root.resolve()),
            "FLYWHEEL_TRAINER_JOB_SCRATCH_DIR": str((settings.data_dir / "scratch").resolve()),
        }
        self.stop_grace_s = stop_grace_s
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def log_path(self, job_id: str) -> Path:
        return self.logs_dir / f"{job_id}.log"

    def scratch_path(self, job_id: str) -> Path:
        """The job's scratch folder (`<scratch dir>/<job id>`, as the job lays it out), with the
        scratch dir the job is given: the trainer's own FLYWHEEL_TRAINER_JOB_SCRATCH_DIR when set."""
        key = "FLYWHEEL_TRAINER_JOB_SCRATCH_DIR"
        return Path(os.environ.get(key) or self.env[key]) / job_id

    def clean_up(self, job_id: str) -> None:
        """Removes the job's scratch folder when the job left it (SIGKILL, a crash: its own clean-up
        did not run) and no process runs the job any more: merged weights and exports, gigabytes."""
        if not job_id or Path(job_id).name != job_id or job_id in (".", ".."):
            return
        scratch = self.scratch_path(job_id)
        if not scratch.exists() or _running_job(job_id) is not None:
            return
        shutil.rmtree(scratch, ignore_errors=True)
        log.warning("removed the scratch folder job %s left", job_id, extra={"job_id": job_id})

    def launch(self, spec: JobSpec) -> str:
        """Starts the job, or adopts its process when one already runs it (the trainer stopped
        between starting it and recording that it had)."""
        running = _running_job(spec.job_id)
        if running is not None:
            log.warning(
                "job %s already runs as process %d: adopting it",
                spec.job_id,
                running,
                extra={"job_id": spec.job_id},
            )
            return f"{running}/{spec.job_id}"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        # Settings the trainer was given for its jobs (FLYWHEEL_TRAINER_JOB_*) pass through;
        # where the artifacts and scratch space are is the trainer's to say, unless set there.
        env = {**self.env, **os.environ}
        env["FLYWHEEL_TRAINER_JOB_ARTIFACT_ROOT"] = self.env["FLYWHEEL_TRAINER_JOB_ARTIFACT_ROOT"]
        with self.log_path(spec.job_id).open("ab") as log_file:
            proc = subprocess.Popen(
                [*self.command, *spec.args()],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        handle = f"{proc.pid}/{spec.job_id}"
        with self._lock:
            self._procs[handle] = proc
        log.info("launched job %s as process %d", spec.job_id, proc.pid, extra={"job_id": spec.job_id})
        return handle

    def wait(self, handle: str) -> Outcome:
        with self._lock:
            proc = self._procs.get(handle)
        if proc is not None:
            code = proc.wait()
            with self._lock:
                self._procs.pop(handle, None)
            return _exit_outcome(code)
        # Adopted from an earlier trainer: not our child, so only its disappearance can be seen.
        pid, job_id = _parse(handle)
        while _alive(pid, job_id):
            time.sleep(1.0)
        return Outcome(None, "process ended (adopted after a trainer restart: exit code unknown)")

    def stop(self, handle: str) -> None:
        pid, job_id = _parse(handle)
        with self._lock:
            proc = self._procs.get(handle)

        def running() -> bool:
            # Our own child holds its pid until it is reaped, so its exit status is the truth; its
            # command line may not show the job yet right after launch. An adopted job has only that.
            return proc.poll() is None if proc is not None else _alive(pid, job_id)

        if not running():
            return
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + self.stop_grace_s
        while time.monotonic() < deadline:
            if not running():
                return
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def _exit_outcome(code: int) -> Outcome:
    if code == 0:
        return Outcome(True)
    if code < 0:
        return Outcome(False, f"killed by {signal.Signals(-code).name}")
    if code == 128 + signal.SIGTERM:  # how the job exits on SIGTERM, once it has cleaned up
        return Outcome(False, f"stopped by SIGTERM (exit code {code})")
    return Outcome(False, f"exit code {code}")


def _parse(handle: str) -> tuple[int, str]:
    pid, _, job_id = handle.partition("/")
    return int(pid), job_id


def _alive(pid: int, job_id: str) -> bool:
    """Whether the job's process still runs: the pid exists, is no zombie and runs this job."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
    except (OSError, IndexError):
        return True  # no /proc to ask: trust the pid
    return state != "Z" and (not job_id or job_id in cmdline)


def _running_job(job_id: str) -> int | None:
    """The pid of a live process started for `job_id` (its arguments end in `--job-id <id>`, and it
    leads its own session, as `launch` starts it: not a child it forked), or None."""
    marker = b"\0--job-id\0" + job_id.encode() + b"\0"
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return None  # no /proc to ask
    for entry in entries:
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if marker not in b"\0" + (entry / "cmdline").read_bytes() or os.getsid(pid) != pid:
                continue
        except OSError:
            continue  # ended meanwhile, or not ours to see
        if _alive(pid, job_id):
            return pid
    return None


# ---------------------------------------------------------------- Kubernetes

_DNS_LABEL = re.compile(r"[^a-z0-9-]+")
_MAX_NAME = 63
JOB_ID_LABEL = "flywheel.io/job-id"
DATASET_ID_LABEL = "flywheel.io/dataset-id"


def load_template(path: Path) -> dict[str, Any]:
    """The Job template (the chart renders it into the trainer's ConfigMap as job.yaml)."""
    doc = yaml.safe_load(Path(path).read_text())
    if not isinstance(doc, dict) or doc.get("kind") != "Job":
        raise ValueError(f"{path} is not a Kubernetes Job")
    return doc


def _dns(text: str) -> str:
    return _DNS_LABEL.sub("-", text.lower())


def job_name(prefix: str, job_id: str) -> str:
    """`<prefix><job id>` as a DNS label (63 characters at most), the same for the same job.

    Cut plainly, a long prefix (a long release name) would cut off the job ids' distinct ends and
    give two jobs one name (the second would adopt the first's Job): a name too long keeps the
    whole job id after a shortened prefix, and ends with a digest of the full name.
    """
    full = _dns(f"{prefix}{job_id}").strip("-")
    if len(full) <= _MAX_NAME:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    room = _MAX_NAME - len(digest) - 1
    job = _dns(job_id).strip("-")
    head = _dns(prefix).lstrip("-")[: max(room - len(job), 0)]
    return f"{f'{head}{job}'[:room].strip('-')}-{digest}"


def build_job(template: dict[str, Any], spec: JobSpec, namespace: str) -> dict[str, Any]:
    """The Job for `spec`: the template with a name, labels and the job's arguments appended."""
    job = copy.deepcopy(template)
    meta = job.setdefault("metadata", {})
    prefix = meta.pop("generateName", None) or "flywheel-train-"
    meta["name"] = job_name(prefix, spec.job_id)
    meta["namespace"] = namespace
    labels = {JOB_ID_LABEL: spec.job_id, DATASET_ID_LABEL: spec.dataset_id}
    meta.setdefault("labels", {}).update(labels)
    pod = job["spec"]["template"]
    pod.setdefault("metadata", {}).setdefault("labels", {}).update(labels)
    containers = pod["spec"]["containers"]
    container = next((c for c in containers if c.get("name") == "train"), containers[0])
    container["args"] = [*(container.get("args") or []), *spec.args()]
    for c in containers:
        resources = c.get("resources") or {}
        for kind in ("requests", "limits"):
            if kind in resources:
                # Quantities are strings in the API; YAML reads the chart's GPU count as the number 1,
                # which the Kubernetes client refuses (found by the first GPU Job on a real API server).
                resources[kind] = {name: str(value) for name, value in resources[kind].items()}
    return job


def job_outcome(status: Any) -> Outcome | None:
    """A finished Job's outcome from its status (a V1JobStatus or its dict); None while it runs.

    Only `Complete` and `Failed` end it: `FailureTarget` and `SuccessCriteriaMet` come while its pods
    may still run (kubernetes/kubernetes#123775), and a pod that registers a candidate after the job
    was recorded failed would leave a version no one announces and retention never removes.
    """
    if status is None:
        return None
    as_dict = status if isinstance(status, dict) else status.to_dict()
    for cond in as_dict.get("conditions") or []:
        if str(cond.get("status")) != "True":
            continue
        if cond.get("type") == "Complete":
            return Outcome(True)
        if cond.get("type") == "Failed":
            reason = cond.get("reason") or "Failed"
            message = cond.get("message") or ""
            return Outcome(False, f"{reason}: {message}".rstrip(": "))
    return None


def kube_api_client(kubeconfig: Path | None) -> Any:
    """An ApiClient from the kubeconfig file when one is given, else in-cluster config when in a
    pod, else the default kubeconfig."""
    from kubernetes import client, config

    if kubeconfig is not None:
        return config.new_client_from_config(config_file=str(kubeconfig))
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        return client.ApiClient()
    return config.new_client_from_config()


class KubernetesJobLauncher(JobLauncher):
    """Creates a batch/v1 Job per training job from the chart's template and watches it to the end.

    Handles are Job names; a Job that already exists (the trainer restarted after creating it)
    is adopted, never created twice.
    """

    name = "kubernetes"

    def __init__(
        self,
        settings: TrainerSettings,
        *,
        api: Any = None,
        watch_factory: Callable[[], Any] | None = None,
        watch_timeout_s: int = 60,
    ) -> None:
        if settings.jobs.template_file is None:
            raise ValueError("the kubernetes launcher needs jobs.template_file (the chart's job.yaml)")
        self.template = load_template(settings.jobs.template_file)
        self.namespace = settings.jobs.namespace
        self._kubeconfig = settings.jobs.kubeconfig
        self._api = api
        self._watch_factory = watch_factory
        self.watch_timeout_s = watch_timeout_s

    @property
    def api(self) -> Any:
        """The BatchV1Api, connected on first use."""
        if self._api is None:
            from kubernetes import client

            self._api = client.BatchV1Api(kube_api_client(self._kubeconfig))
        return self._api

    def build(self, spec: JobSpec) -> dict[str, Any]:
        return build_job(self.template, spec, self.namespace)

    def launch(self, spec: JobSpec) -> str:
        from kubernetes.client.rest import ApiException

        body = self.build(spec)
        name = body["metadata"]["name"]
        try:
            self.api.create_namespaced_job(self.namespace, body)
            log.info("created Job %s for %s", name, spec.job_id, extra={"job_id": spec.job_id})
        except ApiException as exc:
            if exc.status != 409:
                raise
            log.warning("Job %s already exists: adopting it", name, extra={"job_id": spec.job_id})
        return str(name)

    def wait(self, handle: str) -> Outcome:
        from kubernetes import watch
        from kubernetes.client.rest import ApiException

        new_watch = self._watch_factory or watch.Watch
        while True:
            try:
                job = self.api.read_namespaced_job(handle, self.namespace)
            except ApiException as exc:
                if exc.status == 404:
                    return Outcome(False, f"Job {handle} was deleted before it finished")
                raise
            outcome = job_outcome(job.status)
            if outcome is not None:
                return outcome
            w = new_watch()
            try:
                for event in w.stream(
                    self.api.list_namespaced_job,
                    self.namespace,
                    field_selector=f"metadata.name={handle}",
                    timeout_seconds=self.watch_timeout_s,
                ):
                    if event.get("type") == "DELETED":
                        return Outcome(False, f"Job {handle} was deleted before it finished")
                    outcome = job_outcome(getattr(event.get("object"), "status", None))
                    if outcome is not None:
                        return outcome
            except ApiException as exc:
                if exc.status != 410:  # 410: resourceVersion too old; read and watch again
                    raise
            finally:
                w.stop()

    def stop(self, handle: str) -> None:
        from kubernetes.client.rest import ApiException

        try:
            self.api.delete_namespaced_job(handle, self.namespace, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise


def build_launcher(settings: TrainerSettings) -> JobLauncher:
    """The launcher the settings name (auto: Kubernetes when a Job template is configured)."""
    kind = settings.jobs.launcher
    if kind == "kubernetes" or (kind == "auto" and settings.jobs.template_file is not None):
        return KubernetesJobLauncher(settings)
    return LocalJobLauncher(settings)
