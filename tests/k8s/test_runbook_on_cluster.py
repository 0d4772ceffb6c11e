"""docs/runbook.md's kubectl commands against the installed chart: the names, selectors and paths
they use resolve to what the runbook says, and a GPU pod that cannot be scheduled is described with
the messages the runbook tells operators to look for.

`kubectl logs`, `exec` and `port-forward` are not run: they go through a kubelet, which KWOK fakes
only with extra Logs/Exec/PortForward rules in its configuration, and even then it would print a
file or run a command of this host, not the container's; what would make them wrong here is a name,
container, port or path that does not resolve, and that is what these tests check.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import pytest
import yaml
from flywheel_k8s import RELEASE, Install, get

from flywheel_cli.local.cluster import GPU_RESOURCE, POOL_LABEL, LocalCluster

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

# The label of the pods these tests create, so that no Service, PDB or runbook selector counts them.
PROBE_LABEL = "flywheel.io/runbook-probe"
SCHEDULE_WAIT_S = 60


def _deployments(install: Install) -> dict[str, dict[str, Any]]:
    """The release's Deployments by service (`$REL-<service>` with REL=flywheel)."""
    return {
        d["metadata"]["name"].removeprefix(f"{RELEASE}-"): d
        for d in install.manifest()
        if d["kind"] == "Deployment"
    }


def test_per_service_names_and_selectors_resolve(installs: dict[str, Install]) -> None:
    """`get pods -l app.kubernetes.io/component=<service>` finds the pods of `deploy/$REL-<service>`,
    the object `logs deploy/$REL-<service>` and `exec deploy/$REL-<service>` name; each pod's
    default container is the service's own, so neither command needs `-c`."""
    install = installs["cpu-values.yaml"]
    cluster, ns = install.cluster, install.namespace
    deployments = _deployments(install)
    assert {"inference", "feedback", "gateway", "trainer", "evaluator"} <= set(deployments)
    for service in deployments:
        deployment = get(cluster, f"deploy/{RELEASE}-{service}", "-n", ns)
        selector = ",".join(f"{k}={v}" for k, v in deployment["spec"]["selector"]["matchLabels"].items())
        owned = {p["metadata"]["name"] for p in get(cluster, "pods", "-n", ns, "-l", selector)["items"]}
        by_component = get(cluster, "pods", "-n", ns, "-l", f"app.kubernetes.io/component={service}")
        listed = {p["metadata"]["name"] for p in by_component["items"]}
        assert listed and listed == owned, service
        for pod in by_component["items"]:
            default = pod["metadata"]["annotations"].get("kubectl.kubernetes.io/default-container")
            assert default == service, pod["metadata"]["name"]
            assert service in {c["name"] for c in pod["spec"]["containers"]}


def test_get_hpa_shows_the_inference_autoscaler(installs: dict[str, Install]) -> None:
    """`kubectl -n $NS get hpa` lists the inference HPA against `deploy/$REL-inference`, with the
    `maxReplicas` of `inference.autoscaling.maxReplicas`."""
    install = installs["cpu-values.yaml"]
    out = install.cluster.kubectl("-n", install.namespace, "get", "hpa")
    assert f"Deployment/{RELEASE}-inference" in out
    hpa = get(install.cluster, "hpa", f"{RELEASE}-inference", "-n", install.namespace)
    values = yaml.safe_load(install.values.read_text())
    assert hpa["spec"]["maxReplicas"] == values["inference"]["autoscaling"]["maxReplicas"]


@pytest.mark.parametrize(
    ("service", "path", "claim"),
    [
        ("trainer", "/var/lib/flywheel/trainer", "trainer-data"),
        ("evaluator", "/var/lib/flywheel/artifacts", "artifacts"),
    ],
)
def test_runbook_paths_are_on_their_claims(
    installs: dict[str, Install], service: str, path: str, claim: str
) -> None:
    """`exec deploy/$REL-trainer -- df -h /var/lib/flywheel/trainer` and `exec deploy/$REL-evaluator
    -- du -sh /var/lib/flywheel/artifacts/*/` (FlywheelArtifactStoreFilling): each path is the mount
    of the claim `<release>-<claim>`, which is Bound."""
    install = installs["cpu-values.yaml"]
    cluster, ns = install.cluster, install.namespace
    (pod,) = get(cluster, "pods", "-n", ns, "-l", f"app.kubernetes.io/component={service}")["items"]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == service]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert claims[mounts[path]] == f"{RELEASE}-{claim}"
    assert get(cluster, "pvc", f"{RELEASE}-{claim}", "-n", ns)["status"]["phase"] == "Bound"


@pytest.mark.parametrize(("service", "port"), [("trainer", 50053), ("evaluator", 50054)])
def test_port_forward_targets_resolve(installs: dict[str, Install], service: str, port: int) -> None:
    """`port-forward svc/$REL-<service> <port>` then grpcurl on localhost:<port>: the Service has
    that port, its selector finds a Ready pod, and the port's targetPort is a port of that pod."""
    install = installs["cpu-values.yaml"]
    cluster, ns = install.cluster, install.namespace
    svc = get(cluster, f"svc/{RELEASE}-{service}", "-n", ns)
    (entry,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
    selector = ",".join(f"{k}={v}" for k, v in svc["spec"]["selector"].items())
    pods = get(cluster, "pods", "-n", ns, "-l", selector)["items"]
    assert pods
    for pod in pods:
        ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}.get("Ready")
        assert ready == "True", pod["metadata"]["name"]
        ports = [p for c in pod["spec"]["containers"] for p in c.get("ports", [])]
        assert any(p.get("name") == entry["targetPort"] for p in ports), entry
        (named,) = [p for p in ports if p.get("name") == entry["targetPort"]]
        assert named["containerPort"] == port, "forwarding <port> reaches the gRPC port"


def test_get_kafkatopic_lists_the_feedback_topic(installs: dict[str, Install]) -> None:
    """`kubectl -n kafka get kafka,kafkatopic`: the KafkaTopics the chart creates with Strimzi on
    (the GPU scenario) are in the Kafka namespace, the feedback topic among them. The `kafka` kind
    itself needs Strimzi's Kafka CRD, which is not installed here (tests/k8s/kafkatopic-crd.yaml)."""
    cluster = installs["gpu-values.yaml"].cluster
    topics = get(cluster, "kafkatopic", "-n", "kafka")["items"]
    assert "flywheel.feedback.v1" in {t["spec"]["topicName"] for t in topics}


def _probe_pod(template: dict[str, Any], name: str, gpus: int | None = None) -> dict[str, Any]:
    """A bare pod from a Deployment's pod template, labelled so nothing of the release selects it."""
    spec = copy.deepcopy(template["spec"])
    if gpus is not None:
        for c in spec["containers"]:
            if GPU_RESOURCE in (c.get("resources", {}).get("limits") or {}):
                c["resources"]["limits"][GPU_RESOURCE] = str(gpus)
                c["resources"].setdefault("requests", {})[GPU_RESOURCE] = str(gpus)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {PROBE_LABEL: "yes"}},
        "spec": spec,
    }


def _free_gpus(cluster: LocalCluster) -> dict[str, int]:
    nodes = [n for n in get(cluster, "nodes")["items"] if n["metadata"]["labels"][POOL_LABEL] == "gpu"]
    free = {n["metadata"]["name"]: int(n["status"]["allocatable"][GPU_RESOURCE]) for n in nodes}
    for pod in get(cluster, "pods", "-A")["items"]:
        if pod["spec"].get("nodeName") in free and pod["status"].get("phase") not in ("Succeeded", "Failed"):
            for c in pod["spec"]["containers"]:
                requested = (c.get("resources", {}).get("requests") or {}).get(GPU_RESOURCE, "0")
                free[pod["spec"]["nodeName"]] -= int(requested)
    return free


def _describe_when_unschedulable(cluster: LocalCluster, ns: str, name: str) -> str:
    """`kubectl describe pod` once the scheduler has recorded why the pod cannot be placed."""
    deadline = time.monotonic() + SCHEDULE_WAIT_S
    while True:
        out = cluster.kubectl("-n", ns, "describe", "pod", name)
        if "FailedScheduling" in out:
            return out
        assert time.monotonic() < deadline, f"{name}: no FailedScheduling event in {SCHEDULE_WAIT_S} s"
        time.sleep(1.0)


def test_describe_pending_gpu_pod_says_why(installs: dict[str, Install]) -> None:
    """Step 3 of FlywheelServiceDown: with the GPU pool full, `describe pod` of a pending inference
    pod says "Insufficient nvidia.com/gpu"; with tolerations that do not match the pool's taint, it
    says "untolerated taint" (and not Insufficient)."""
    install = installs["gpu-values.yaml"]
    cluster, ns = install.cluster, install.namespace
    template = _deployments(install)["inference"]["spec"]["template"]
    pods: list[dict[str, Any]] = []
    try:
        untolerated = _probe_pod(template, "runbook-untolerated")
        untolerated["spec"].pop("tolerations", None)
        pods.append(untolerated)
        cluster.kubectl("-n", ns, "apply", "-f", "-", stdin=json.dumps(untolerated))
        out = _describe_when_unschedulable(cluster, ns, "runbook-untolerated")
        assert "untolerated taint" in out and "Insufficient" not in out, out[-800:]

        # Fill every GPU node with a pod pinned to it, then ask for one more GPU.
        for node, free in _free_gpus(cluster).items():
            if free > 0:
                filler = _probe_pod(template, f"runbook-fill-{node}", gpus=free)
                filler["spec"]["nodeSelector"] = {
                    **filler["spec"].get("nodeSelector", {}),
                    "kubernetes.io/hostname": node,
                }
                pods.append(filler)
                cluster.kubectl("-n", ns, "apply", "-f", "-", stdin=json.dumps(filler))
        for filler in pods[1:]:
            cluster.kubectl(
                "-n", ns, "wait", "--for=condition=PodScheduled", f"pod/{filler['metadata']['name']}",
                f"--timeout={SCHEDULE_WAIT_S}s",
            )  # fmt: skip
        one_more = _probe_pod(template, "runbook-one-more")
        pods.append(one_more)
        cluster.kubectl("-n", ns, "apply", "-f", "-", stdin=json.dumps(one_more))
        out = _describe_when_unschedulable(cluster, ns, "runbook-one-more")
        assert f"Insufficient {GPU_RESOURCE}" in out, out[-800:]
    finally:
        if pods:
            cluster.kubectl("-n", ns, "delete", "pod", "-l", PROBE_LABEL, "--wait=true", "--timeout=60s")
