"""Helpers of the k8s tier: helm and kubectl against the local control plane, one installed scenario."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flywheel_cli.local.cluster import LocalCluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "flywheel"
HELM = ROOT / ".cache" / "tools" / "bin" / "helm"
RELEASE = "flywheel"
SCENARIOS = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
# Strimzi's KafkaTopic CRD is published by no package registry reachable here: a stand-in written
# from its documented schema (tests/k8s/kafkatopic-crd.yaml), so the GPU scenario's topics install.
KAFKATOPIC_CRD = Path(__file__).resolve().parent / "kafkatopic-crd.yaml"
INSTALL_TIMEOUT = "180s"


def helm(cluster: LocalCluster, *args: str, timeout: float = 300) -> str:
    """helm with the cluster's admin kubeconfig; a failure shows helm's stderr."""
    proc = subprocess.run(
        [str(HELM), "--kubeconfig", str(cluster.kubeconfig), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args[:3])} failed:\n{proc.stderr.strip()}")
    return proc.stdout


def get(cluster: LocalCluster, *args: str) -> Any:
    """`kubectl get ... -o json`, parsed."""
    return json.loads(cluster.kubectl("get", *args, "-o", "json"))


@dataclass(frozen=True)
class Install:
    """One scenario of the chart installed into its own namespace."""

    cluster: LocalCluster
    scenario: str
    namespace: str
    values: Path

    def manifest(self) -> list[dict[str, Any]]:
        out = helm(self.cluster, "get", "manifest", RELEASE, "-n", self.namespace)
        return [d for d in yaml.safe_load_all(out) if d]
