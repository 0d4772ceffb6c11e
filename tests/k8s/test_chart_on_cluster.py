"""The chart against a real API server: every scenario installs and rolls out, GPU workloads land on
the GPU pool only, the CRD-backed and policy objects are accepted, `helm test`, upgrade and rollback work."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flywheel_k8s import CHART, RELEASE, SCENARIOS, Install, get, helm

from flywheel_cli.local.cluster import GPU_RESOURCE, POOL_LABEL, ClusterError, LocalCluster

pytestmark = [pytest.mark.k8s, pytest.mark.slow]


@pytest.fixture(params=SCENARIOS)
def install(request: pytest.FixtureRequest, installs: dict[str, Install]) -> Install:
    return installs[request.param]


def _requests_gpu(pod: dict[str, Any]) -> bool:
    return any(
        GPU_RESOURCE in (c.get("resources", {}).get("limits") or {}) for c in pod["spec"]["containers"]
    )


def test_every_deployment_is_available(install: Install) -> None:
    deployments = get(install.cluster, "deployments", "-n", install.namespace)["items"]
    rendered = {d["metadata"]["name"] for d in install.manifest() if d["kind"] == "Deployment"}
    assert {d["metadata"]["name"] for d in deployments} == rendered and rendered
    for d in deployments:
        available = {c["type"]: c["status"] for c in d["status"].get("conditions", [])}.get("Available")
        assert available == "True", d["metadata"]["name"]
        assert d["status"].get("availableReplicas") == d["spec"]["replicas"], d["metadata"]["name"]


def test_gpu_workloads_land_on_the_gpu_pool_only(install: Install) -> None:
    cluster = install.cluster
    pools = {
        n["metadata"]["name"]: n["metadata"]["labels"][POOL_LABEL] for n in get(cluster, "nodes")["items"]
    }
    pods = get(cluster, "pods", "-n", install.namespace)["items"]
    assert pods
    for pod in pods:
        pool = pools[pod["spec"]["nodeName"]]
        assert pool == ("gpu" if _requests_gpu(pod) else "cpu"), pod["metadata"]["name"]
    if install.scenario == "gpu-values.yaml":
        assert any(_requests_gpu(p) for p in pods), "the GPU scenario runs inference on GPUs"


def test_every_rendered_object_was_accepted(install: Install) -> None:
    """NetworkPolicies, PodDisruptionBudgets, ServiceMonitors, the PrometheusRule, KafkaTopics: each
    object of the release exists on the server as the chart named it."""
    kinds: dict[str, set[str]] = {}
    for doc in install.manifest():
        namespace = doc["metadata"].get("namespace", install.namespace)
        found = get(install.cluster, _resource(doc), doc["metadata"]["name"], "-n", namespace)
        assert found["metadata"]["name"] == doc["metadata"]["name"]
        kinds.setdefault(doc["kind"], set()).add(doc["metadata"]["name"])
    if install.scenario == "gpu-values.yaml":
        assert {
            "ServiceMonitor",
            "PrometheusRule",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "KafkaTopic",
        } <= set(kinds)


def _resource(doc: dict[str, Any]) -> str:
    """kubectl's fully qualified name of the object's type (KIND.VERSION.GROUP; KIND for the core group)."""
    group, _, version = doc["apiVersion"].rpartition("/")
    return f"{doc['kind']}.{version}.{group}" if group else doc["kind"]


def test_hpas_reference_existing_targets(install: Install) -> None:
    hpas = get(install.cluster, "hpa", "-n", install.namespace)["items"]
    for hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        target = get(install.cluster, f"{ref['kind'].lower()}s", ref["name"], "-n", install.namespace)
        assert target["kind"] == ref["kind"]


def test_helm_test_passes(install: Install) -> None:
    out = helm(install.cluster, "test", RELEASE, "-n", install.namespace, "--timeout", "120s")
    assert "Phase:" in out and "Succeeded" in out


def test_crds_reject_what_prometheus_operator_would(
    cluster: LocalCluster, installs: dict[str, Install]
) -> None:
    """The CRDs are the operator's own, with their schemas: a ServiceMonitor with an endpoint's port
    of the wrong type and a PrometheusRule without groups are refused (server-side dry run)."""
    bad_monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "bad", "namespace": "gpu"},
        "spec": {"selector": {}, "endpoints": [{"port": 9100, "interval": "soon"}]},
    }
    bad_rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "bad", "namespace": "gpu"},
        "spec": {"groups": [{"rules": [{"alert": "X"}]}]},
    }
    for bad in (bad_monitor, bad_rule):
        with pytest.raises(ClusterError, match=r"Invalid value|Required value"):
            cluster.kubectl("apply", "--dry-run=server", "-f", "-", stdin=json.dumps(bad))


def _revision(cluster: LocalCluster, namespace: str, name: str) -> tuple[str, dict[str, Any]]:
    d = get(cluster, "deployment", name, "-n", namespace)
    return d["metadata"]["annotations"]["deployment.kubernetes.io/revision"], d["spec"]["template"]


def test_upgrade_rolls_the_pods_and_rollback_restores_them(installs: dict[str, Install]) -> None:
    install = installs["cpu-values.yaml"]
    cluster, namespace = install.cluster, install.namespace
    name = f"{RELEASE}-feedback"
    before_revision, before = _revision(cluster, namespace, name)
    helm(
        cluster, "upgrade", RELEASE, str(CHART), "-n", namespace, "-f", str(install.values),
        "--set", "feedback.podAnnotations.flywheel\\.io/rolled=yes", "--wait", "--timeout", "120s",
    )  # fmt: skip
    rolled_revision, rolled = _revision(cluster, namespace, name)
    assert int(rolled_revision) > int(before_revision)
    assert rolled["metadata"]["annotations"]["flywheel.io/rolled"] == "yes"
    pods = get(cluster, "pods", "-n", namespace, "-l", "app.kubernetes.io/component=feedback")["items"]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    assert live and all(p["metadata"]["annotations"].get("flywheel.io/rolled") == "yes" for p in live)

    helm(cluster, "rollback", RELEASE, "-n", namespace, "--wait", "--timeout", "120s")
    restored_revision, restored = _revision(cluster, namespace, name)
    assert int(restored_revision) > int(rolled_revision)
    assert "flywheel.io/rolled" not in (restored["metadata"].get("annotations") or {})
    assert restored == before
    history = helm(cluster, "history", RELEASE, "-n", namespace, "-o", "json")
    assert [h["status"] for h in json.loads(history)][-3:] == ["superseded", "superseded", "deployed"]


def test_runbook_first_look_lists_the_release(installs: dict[str, Install]) -> None:
    """docs/runbook.md's first command (`kubectl -n $NS get deploy,po,job -l
    app.kubernetes.io/instance=$REL`) shows every Deployment and its pods."""
    install = installs["cpu-values.yaml"]
    out = install.cluster.kubectl(
        "-n", install.namespace, "get", "deploy,po,job", "-l", f"app.kubernetes.io/instance={RELEASE}"
    )
    for d in install.manifest():
        if d["kind"] == "Deployment":
            assert f"deployment.apps/{d['metadata']['name']}" in out or d["metadata"]["name"] in out
    per_service = install.cluster.kubectl(
        "-n", install.namespace, "get", "pods", "-l", "app.kubernetes.io/component=inference", "-o", "name"
    )
    assert per_service.strip(), "the runbook's per-service pod selector finds the inference pods"


def test_subprocess_helpers_fail_loudly(cluster: LocalCluster) -> None:
    with pytest.raises(ClusterError, match=r"NotFound|not found"):
        cluster.kubectl("get", "deployment", "no-such-deployment", "-n", "default")
    with pytest.raises(AssertionError, match="not found"):
        helm(cluster, "status", "no-such-release", "-n", "default")
