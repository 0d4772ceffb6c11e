"""Fixtures of the k8s tier: one local control plane for the session (KWOK nodes), helm against it,
and the chart installed once per ci/*-values.yaml scenario, each in its own namespace."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from flywheel_cli.local.cluster import LocalCluster

# The helpers live beside the tests; --import-mode=importlib does not put this folder on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flywheel_k8s import CHART, HELM, INSTALL_TIMEOUT, KAFKATOPIC_CRD, RELEASE, SCENARIOS, Install, helm


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A control plane of this session's own (random ports), deleted at the end."""
    if os.environ.get("FLYWHEEL_SKIP_K8S"):
        pytest.skip("FLYWHEEL_SKIP_K8S is set")
    local = LocalCluster(f"fw-test-{os.getpid()}", workdir=tmp_path_factory.mktemp("k8s"))
    missing = local.missing()
    if missing:
        pytest.skip(f"no local control plane ({', '.join(missing)} missing): run scripts/install-k8s")
    if not HELM.is_file():
        pytest.skip("helm is not installed: run scripts/install-deploy-tools")
    try:
        local.up(timeout_s=300)
        local.kubectl("apply", "-f", str(KAFKATOPIC_CRD))
        local.kubectl("wait", "--for=condition=Established", "crd/kafkatopics.kafka.strimzi.io")
        yield local
    finally:
        local.down()


def _persistent_volume(name: str) -> dict[str, Any]:
    # No storage provisioner runs: static volumes (no class, both access modes) the claims bind to.
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": "1Ti"},
            "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": f"/var/lib/flywheel-test/{name}"},
        },
    }


@pytest.fixture(scope="session")
def installs(cluster: LocalCluster) -> dict[str, Install]:
    """Every scenario installed with `helm install --wait`: its claims bound, its Deployments available."""
    volumes = [_persistent_volume(f"pv-{i}") for i in range(3 * len(SCENARIOS))]
    cluster.kubectl(
        "apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": volumes})
    )
    cluster.kubectl("create", "namespace", "kafka")  # the GPU scenario's KafkaTopics live there
    done = {}
    for scenario in SCENARIOS:
        namespace = scenario.removesuffix("-values.yaml")
        values = CHART / "ci" / scenario
        cluster.kubectl("create", "namespace", namespace)
        if yaml.safe_load(values.read_text()).get("artifacts", {}).get("existingClaim"):
            claim = {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": "flywheel-artifacts", "namespace": namespace},
                "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "10Gi"}}},
            }
            cluster.kubectl("apply", "-f", "-", stdin=json.dumps(claim))
        helm(
            cluster, "install", RELEASE, str(CHART), "-n", namespace, "-f", str(values),
            "--wait", "--timeout", INSTALL_TIMEOUT,
        )  # fmt: skip
        done[scenario] = Install(cluster, scenario, namespace, values)
    return done
