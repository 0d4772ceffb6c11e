"""The trainer's real KubernetesJobLauncher, with the trainer ServiceAccount's own token (not the
admin's): it creates the chart's training Job, watches it to Succeeded or Failed, deletes it, and
the ServiceAccount can do nothing it must not."""

from __future__ import annotations

import base64
import copy
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from flywheel_k8s import RELEASE, Install, get

from flywheel_cli.local.cluster import GPU_RESOURCE, POOL_LABEL, ClusterError, LocalCluster
from flywheel_trainer.launchers import JOB_ID_LABEL, JobSpec, KubernetesJobLauncher, Outcome
from flywheel_trainer.settings import JobsSettings, TrainerSettings

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

# tools/k8s/kwok.yaml: a Job's pod with this annotation ends Failed (exit code 1).
FAIL_ANNOTATION = "flywheel.io/kwok-outcome"
WAIT_S = 120


def service_account_kubeconfig(cluster: LocalCluster, namespace: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the trainer's ServiceAccount with a token the API server
    issues for it (TokenRequest), against the cluster's server and CA."""
    account = f"{RELEASE}-trainer"
    token = cluster.kubectl("create", "token", account, "-n", namespace, "--duration=1h").strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    server = dict(admin["clusters"][0]["cluster"])
    if "certificate-authority" in server:
        ca = Path(server.pop("certificate-authority")).read_bytes()
        server["certificate-authority-data"] = base64.b64encode(ca).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": server}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [
            {"name": account, "context": {"cluster": "local", "user": account, "namespace": namespace}}
        ],
        "current-context": account,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def job_template(cluster: LocalCluster, namespace: str) -> dict[str, Any]:
    """The Job template as the trainer reads it: job.yaml of the chart's ConfigMap."""
    config_map = get(cluster, "configmap", f"{RELEASE}-trainer-job-template", "-n", namespace)
    return dict(yaml.safe_load(config_map["data"]["job.yaml"]))


def launcher_for(
    template: dict[str, Any], namespace: str, kubeconfig: Path, tmp_path: Path
) -> KubernetesJobLauncher:
    path = tmp_path / f"job-{len(list(tmp_path.glob('job-*')))}.yaml"
    path.write_text(yaml.safe_dump(template))
    jobs = JobsSettings(launcher="kubernetes", template_file=path, namespace=namespace, kubeconfig=kubeconfig)
    return KubernetesJobLauncher(TrainerSettings(jobs=jobs), watch_timeout_s=10)


def wait_with_deadline(launcher: KubernetesJobLauncher, handle: str) -> Outcome:
    """launcher.wait on a thread (as the trainer runs it), bounded so a stuck watch fails the test."""
    result: list[Outcome | BaseException] = []

    def run() -> None:
        try:
            result.append(launcher.wait(handle))
        except BaseException as exc:  # handed to the test thread
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(WAIT_S)
    assert result, f"Job {handle} did not end within {WAIT_S} s"
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


@pytest.fixture(params=["cpu-values.yaml", "gpu-values.yaml"])
def trainer_install(request: pytest.FixtureRequest, installs: dict[str, Install]) -> Install:
    return installs[request.param]


def test_job_succeeds_and_fails_as_its_pod_does(trainer_install: Install, tmp_path: Path) -> None:
    cluster, namespace = trainer_install.cluster, trainer_install.namespace
    kubeconfig = service_account_kubeconfig(cluster, namespace, tmp_path / "trainer.kubeconfig")
    template = job_template(cluster, namespace)
    launcher = launcher_for(template, namespace, kubeconfig, tmp_path)

    spec = JobSpec("job-20260101-000000000-ok000001", "ds-20260101-000000000-ok000001", "v1")
    handle = launcher.launch(spec)
    assert launcher.launch(spec) == handle  # created once; a second launch adopts it
    assert wait_with_deadline(launcher, handle) == Outcome(True)
    job = get(cluster, "job", handle, "-n", namespace)
    assert job["metadata"]["labels"][JOB_ID_LABEL] == spec.job_id
    (pod,) = get(cluster, "pods", "-n", namespace, "-l", f"job-name={handle}")["items"]
    node = get(cluster, "node", pod["spec"]["nodeName"])
    wants_gpu = GPU_RESOURCE in (pod["spec"]["containers"][0]["resources"].get("limits") or {})
    assert node["metadata"]["labels"][POOL_LABEL] == ("gpu" if wants_gpu else "cpu")
    assert wants_gpu == (trainer_install.scenario == "gpu-values.yaml")

    failing = copy.deepcopy(template)
    failing["spec"]["template"]["metadata"].setdefault("annotations", {})[FAIL_ANNOTATION] = "failed"
    failing_launcher = launcher_for(failing, namespace, kubeconfig, tmp_path)
    bad = JobSpec("job-20260101-000000000-bad00001", "ds-20260101-000000000-bad00001", "v1")
    bad_handle = failing_launcher.launch(bad)
    outcome = wait_with_deadline(failing_launcher, bad_handle)
    assert outcome.succeeded is False and "BackoffLimitExceeded" in outcome.reason
    pods = get(cluster, "pods", "-n", namespace, "-l", f"job-name={bad_handle}")["items"]
    assert len(pods) == template["spec"]["backoffLimit"] + 1  # retried as the chart says, then failed

    # docs/runbook.md: `kubectl -n $NS get jobs -l app.kubernetes.io/component=trainer-job`
    listed = cluster.kubectl(
        "-n", namespace, "get", "jobs", "-l", "app.kubernetes.io/component=trainer-job", "-o", "name"
    )
    assert set(listed.split()) == {f"job.batch/{handle}", f"job.batch/{bad_handle}"}

    for h in (handle, bad_handle):
        launcher.stop(h)
        launcher.stop(h)  # already gone: nothing happens
    with pytest.raises(ClusterError, match="NotFound"):
        cluster.kubectl("get", "job", handle, "-n", namespace)


def _can_i(cluster: LocalCluster, kubeconfig: Path, *args: str) -> bool:
    done = subprocess.run(
        [str(cluster.bin_dir / "kubectl"), "--kubeconfig", str(kubeconfig), "auth", "can-i", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    answer = done.stdout.strip()
    assert answer in ("yes", "no"), done.stderr
    return answer == "yes"


def test_trainer_service_account_has_only_what_it_needs(installs: dict[str, Install], tmp_path: Path) -> None:
    install = installs["cpu-values.yaml"]
    cluster, namespace = install.cluster, install.namespace
    kubeconfig = service_account_kubeconfig(cluster, namespace, tmp_path / "trainer.kubeconfig")
    for verb in ("create", "get", "list", "watch", "delete"):
        assert _can_i(cluster, kubeconfig, verb, "jobs.batch", "-n", namespace), verb
    # It reads no pod and no log: the launcher uses the batch API only.
    assert not _can_i(cluster, kubeconfig, "get", "pods", "--subresource=log", "-n", namespace)
    forbidden = [
        ("get", "secrets"),
        ("list", "secrets"),
        ("create", "pods"),
        ("create", "pods", "--subresource=exec"),
        ("update", "jobs.batch"),
        ("patch", "jobs.batch"),
        ("create", "deployments.apps"),
        ("create", "roles.rbac.authorization.k8s.io"),
        ("create", "serviceaccounts", "--subresource=token"),
    ]
    for args in forbidden:
        assert not _can_i(cluster, kubeconfig, *args, "-n", namespace), " ".join(args)
    assert not _can_i(cluster, kubeconfig, "create", "jobs.batch", "-n", "gpu"), "another namespace"
    # And the server refuses it, not only the can-i answer: reading a Secret is Forbidden.
    done = subprocess.run(
        [
            str(cluster.bin_dir / "kubectl"),
            "--kubeconfig",
            str(kubeconfig),
            "get",
            "secrets",
            "-n",
            namespace,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0 and "forbidden" in done.stderr.lower()
