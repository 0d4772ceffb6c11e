"""Launchers: local subprocesses (exit codes, stop, adoption) and Kubernetes Jobs from a template."""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import V1Job, V1JobCondition, V1JobStatus, V1ObjectMeta
from kubernetes.client.rest import ApiException

from flywheel_trainer.launchers import (
    DATASET_ID_LABEL,
    JOB_ID_LABEL,
    JobSpec,
    KubernetesJobLauncher,
    LocalJobLauncher,
    Outcome,
    _running_job,
    build_job,
    job_outcome,
)
from flywheel_trainer.settings import JobsSettings, TrainerSettings

SPEC = JobSpec("job-20240101-000000-abcd", "ds-20240101-000000-abcd", "v3")

# Prints its arguments and the artifact root it was given; exits with the code after "--exit".
SCRIPT = (
    "import os, sys, time; print(sys.argv[1:], os.environ['FLYWHEEL_TRAINER_JOB_ARTIFACT_ROOT']); "
    "time.sleep(float(os.environ.get('FAKE_JOB_SLEEP', '0'))); "
    "sys.exit(int(os.environ.get('FAKE_JOB_EXIT', '0')))"
)


def local(tmp_path: Path) -> LocalJobLauncher:
    settings = TrainerSettings(
        data_dir=tmp_path / "trainer",
        artifact_root=tmp_path / "artifacts",
        jobs=JobsSettings(local_command=["{python}", "-c", SCRIPT]),
    )
    return LocalJobLauncher(settings, stop_grace_s=2)


def test_local_job_gets_its_arguments_and_the_artifact_root(tmp_path: Path) -> None:
    launcher = local(tmp_path)
    handle = launcher.launch(SPEC)
    assert launcher.wait(handle) == Outcome(True)
    logged = launcher.log_path(SPEC.job_id).read_text()
    assert "'--dataset', 'ds-20240101-000000-abcd', '--base-version', 'v3'" in logged
    assert str((tmp_path / "artifacts").resolve()) in logged


def test_local_job_failure_has_its_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_JOB_EXIT", "3")
    launcher = local(tmp_path)
    assert launcher.wait(launcher.launch(SPEC)) == Outcome(False, "exit code 3")
    monkeypatch.setenv("FAKE_JOB_EXIT", "143")  # how a real job exits on SIGTERM, once cleaned up
    assert launcher.wait(launcher.launch(SPEC)) == Outcome(False, "stopped by SIGTERM (exit code 143)")


def test_local_job_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_JOB_SLEEP", "60")
    launcher = local(tmp_path)
    handle = launcher.launch(SPEC)
    started = time.monotonic()
    launcher.stop(handle)
    assert launcher.wait(handle) == Outcome(False, "killed by SIGTERM")
    assert time.monotonic() - started < 10


def test_clean_up_removes_the_scratch_an_ended_job_left_and_keeps_a_running_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLYWHEEL_TRAINER_JOB_SCRATCH_DIR", raising=False)
    monkeypatch.setenv("FAKE_JOB_SLEEP", "60")
    launcher = local(tmp_path)
    scratch = launcher.scratch_path(SPEC.job_id)
    assert scratch == (tmp_path / "trainer" / "scratch" / SPEC.job_id).resolve()
    (scratch / "hf").mkdir(parents=True)
    (scratch / "hf" / "model.safetensors").write_bytes(b"weights")
    handle = launcher.launch(SPEC)
    deadline = time.monotonic() + 10
    while _running_job(SPEC.job_id) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    launcher.clean_up(SPEC.job_id)  # still running: its scratch is in use
    assert scratch.is_dir()
    launcher.stop(handle)
    launcher.wait(handle)
    launcher.clean_up(SPEC.job_id)
    assert not scratch.exists() and scratch.parent.is_dir()
    launcher.clean_up("../scratch")  # not a job id: nothing outside the job's own folder goes
    assert scratch.parent.is_dir()
    # The scratch dir given to the trainer for its jobs is the one the job used.
    monkeypatch.setenv("FLYWHEEL_TRAINER_JOB_SCRATCH_DIR", str(tmp_path / "elsewhere"))
    assert launcher.scratch_path(SPEC.job_id) == tmp_path / "elsewhere" / SPEC.job_id


def test_a_new_launcher_adopts_a_running_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_JOB_SLEEP", "1")
    handle = local(tmp_path).launch(SPEC)
    adopted = local(tmp_path).wait(handle)
    assert adopted.succeeded is None  # not its child: the result file decides


def test_launching_a_job_that_already_runs_adopts_its_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_JOB_SLEEP", "30")
    first, again = local(tmp_path), local(tmp_path)
    handle = first.launch(SPEC)
    try:
        deadline = time.monotonic() + 10
        while _running_job(SPEC.job_id) is None and time.monotonic() < deadline:
            time.sleep(0.01)  # until the child has exec'd the job's command (found by its arguments)
        # A trainer that stopped before recording the launch launches the queued job again.
        assert again.launch(SPEC) == handle and again._procs == {}
        other = again.launch(JobSpec("job-20240101-000000-ef01", SPEC.dataset_id, "v3"))
        assert other != handle
    finally:
        for launcher in (first, again):
            for launched in list(launcher._procs):
                launcher.stop(launched)


# ---------------------------------------------------------------- Kubernetes

TEMPLATE: dict[str, Any] = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "metadata": {"generateName": "fw-flywheel-train-", "namespace": "flywheel", "labels": {"a": "b"}},
    "spec": {
        "backoffLimit": 1,
        "ttlSecondsAfterFinished": 86400,
        "template": {
            "metadata": {"labels": {"a": "b"}},
            "spec": {
                "restartPolicy": "Never",
                "nodeSelector": {"pool": "gpu"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "containers": [
                    {
                        "name": "train",
                        "image": "flywheel-trainer-job:1",
                        "command": ["python", "-m", "flywheel_trainer.job"],
                        "args": [],
                        "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "48Gi"}},
                    }
                ],
            },
        },
    },
}


def test_build_job_names_labels_and_appends_arguments() -> None:
    original = copy.deepcopy(TEMPLATE)
    job = build_job(TEMPLATE, SPEC, "ml")
    assert original == TEMPLATE  # the template is not changed
    meta = job["metadata"]
    assert meta["name"] == "fw-flywheel-train-job-20240101-000000-abcd"
    assert "generateName" not in meta and meta["namespace"] == "ml"
    assert meta["labels"] == {"a": "b", JOB_ID_LABEL: SPEC.job_id, DATASET_ID_LABEL: SPEC.dataset_id}
    pod = job["spec"]["template"]
    assert pod["metadata"]["labels"][JOB_ID_LABEL] == SPEC.job_id
    (container,) = pod["spec"]["containers"]
    assert container["args"] == SPEC.args()
    # Quantities go to the API as strings: the Kubernetes client refuses the YAML number 1.
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1", "memory": "48Gi"}
    assert pod["spec"]["nodeSelector"] == {"pool": "gpu"}


def test_long_names_are_cut_to_a_dns_label() -> None:
    template = copy.deepcopy(TEMPLATE)
    template["metadata"]["generateName"] = "a-very-long-release-name-that-goes-on-and-on-train-"
    name = build_job(template, SPEC, "ml")["metadata"]["name"]
    assert len(name) <= 63 and not name.endswith("-")


def test_long_prefixes_keep_the_names_of_two_jobs_apart() -> None:
    template = copy.deepcopy(TEMPLATE)
    # 50 characters: a release name the chart's own 63-character limit lets through.
    template["metadata"]["generateName"] = "a-very-long-release-name-that-goes-on-and-on-train-"
    specs = [JobSpec(f"job-20240101-000000000-abcdef0{i}", "ds-1", "v3") for i in (1, 2)]
    names = [build_job(template, spec, "ml")["metadata"]["name"] for spec in specs]
    assert names[0] != names[1]
    for spec, name in zip(specs, names, strict=True):
        assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)
        assert spec.job_id in name and name.startswith("a-very-long")
        # The same job always gets the same name: a restarted trainer adopts its Job (409).
        assert build_job(template, spec, "ml")["metadata"]["name"] == name


def test_job_outcome_reads_conditions() -> None:
    assert job_outcome(None) is None
    assert job_outcome(V1JobStatus(active=1)) is None
    done = V1JobStatus(conditions=[V1JobCondition(type="Complete", status="True")])
    assert job_outcome(done) == Outcome(True)
    failed = V1JobStatus(
        conditions=[
            V1JobCondition(type="Failed", status="True", reason="BackoffLimitExceeded", message="too many")
        ]
    )
    assert job_outcome(failed) == Outcome(False, "BackoffLimitExceeded: too many")
    assert job_outcome({"conditions": [{"type": "Failed", "status": "False"}]}) is None


def test_a_job_whose_pods_may_still_run_has_not_ended() -> None:
    # FailureTarget and SuccessCriteriaMet come before the pods terminated (kubernetes#123775): a pod
    # could still register a candidate after the trainer recorded the job failed.
    target = V1JobCondition(type="FailureTarget", status="True", reason="DeadlineExceeded")
    assert job_outcome(V1JobStatus(active=1, conditions=[target])) is None
    assert job_outcome({"conditions": [{"type": "SuccessCriteriaMet", "status": "True"}]}) is None
    ended = V1JobCondition(type="Failed", status="True", reason="DeadlineExceeded")
    assert job_outcome(V1JobStatus(conditions=[target, ended])) == Outcome(False, "DeadlineExceeded")


class FakeBatchApi:
    """The few BatchV1Api calls the launcher makes."""

    def __init__(self, statuses: list[V1JobStatus], *, exists: bool = False) -> None:
        self.created: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.statuses = statuses
        self.exists = exists

    def create_namespaced_job(self, namespace: str, body: dict[str, Any]) -> None:
        if self.exists:
            raise ApiException(status=409, reason="AlreadyExists")
        self.created.append(body)

    def read_namespaced_job(self, name: str, namespace: str) -> V1Job:
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return V1Job(metadata=V1ObjectMeta(name=name), status=status)

    def list_namespaced_job(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("only the fake watch calls this")

    def delete_namespaced_job(self, name: str, namespace: str, **kwargs: Any) -> None:
        self.deleted.append(name)


class FakeWatch:
    """Yields one MODIFIED event with the next status."""

    def __init__(self, api: FakeBatchApi) -> None:
        self.api = api

    def stream(self, func: Any, namespace: str, **kwargs: Any) -> Any:
        assert kwargs["field_selector"].startswith("metadata.name=")
        yield {"type": "MODIFIED", "object": self.api.read_namespaced_job("x", namespace)}

    def stop(self) -> None:
        pass


def kube(tmp_path: Path, api: FakeBatchApi) -> KubernetesJobLauncher:
    template = tmp_path / "job.yaml"
    template.write_text(yaml.safe_dump(TEMPLATE))
    settings = TrainerSettings(
        jobs=JobsSettings(launcher="kubernetes", template_file=template, namespace="ml")
    )
    return KubernetesJobLauncher(settings, api=api, watch_factory=lambda: FakeWatch(api))


def test_kubernetes_launch_watches_to_completion(tmp_path: Path) -> None:
    running = V1JobStatus(active=1)
    done = V1JobStatus(conditions=[V1JobCondition(type="Complete", status="True")])
    api = FakeBatchApi([running, running, done])
    launcher = kube(tmp_path, api)
    name = launcher.launch(SPEC)
    assert [b["metadata"]["name"] for b in api.created] == [name]
    assert launcher.wait(name) == Outcome(True)
    launcher.stop(name)
    assert api.deleted == [name]


def test_kubernetes_job_that_exists_is_adopted_not_created_twice(tmp_path: Path) -> None:
    failed = V1JobStatus(conditions=[V1JobCondition(type="Failed", status="True", reason="DeadlineExceeded")])
    api = FakeBatchApi([failed], exists=True)
    launcher = kube(tmp_path, api)
    name = launcher.launch(SPEC)
    assert api.created == []
    assert launcher.wait(name) == Outcome(False, "DeadlineExceeded")


def test_kubernetes_launcher_needs_a_template() -> None:
    with pytest.raises(ValueError):
        KubernetesJobLauncher(TrainerSettings(jobs=JobsSettings(launcher="kubernetes")))


def test_adoption_is_not_fooled_by_a_reused_pid(tmp_path: Path) -> None:
    import os

    # This test's own pid is alive, but it runs no job called job-elsewhere.
    started = time.monotonic()
    assert local(tmp_path).wait(f"{os.getpid()}/job-elsewhere").succeeded is None
    assert time.monotonic() - started < 1
    local(tmp_path).stop(f"{os.getpid()}/job-elsewhere")  # and stopping it kills nothing
