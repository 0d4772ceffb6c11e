"""The local control plane's fake node pools match what the chart selects; a missing install is named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flywheel_cli.local.cluster import DEFAULT_POOLS, GPU_RESOURCE, ClusterError, LocalCluster
from flywheel_common.files import repo_root

CHART = repo_root() / "deploy" / "helm" / "flywheel"


def _tolerates(tolerations: list[dict[str, str]], taint: dict[str, str]) -> bool:
    for t in tolerations:
        if t.get("key") != taint["key"] or t.get("effect", taint["effect"]) != taint["effect"]:
            continue
        if t.get("operator") == "Exists" or t.get("value") == taint.get("value"):
            return True
    return False


def test_gpu_pool_is_what_the_chart_selects_and_cpu_pool_is_not() -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["gpuPool"]
    gpu_scenario = yaml.safe_load((CHART / "ci" / "gpu-values.yaml").read_text())["gpuPool"]
    pools = {p.name: p for p in DEFAULT_POOLS}
    (gpu_node, *_) = pools["gpu"].nodes()
    labels = gpu_node["metadata"]["labels"]  # type: ignore[index]
    assert gpu_scenario["nodeSelector"].items() <= labels.items()
    assert int(gpu_node["status"]["capacity"][GPU_RESOURCE]) >= 1  # type: ignore[index]
    taints = gpu_node["spec"]["taints"]  # type: ignore[index]
    assert taints and all(_tolerates(defaults["tolerations"], t) for t in taints)
    assert all(_tolerates(gpu_scenario["tolerations"], t) for t in taints)
    for cpu_node in pools["cpu"].nodes():
        assert GPU_RESOURCE not in cpu_node["status"]["capacity"]  # type: ignore[index]
        assert not gpu_scenario["nodeSelector"].items() <= cpu_node["metadata"]["labels"].items()  # type: ignore[index]


def test_up_without_the_binaries_says_how_to_install_them(tmp_path: Path) -> None:
    cluster = LocalCluster("t", workdir=tmp_path / "work", home=tmp_path / "k8s")
    assert "kube-apiserver" in cluster.missing() and "kwokctl" in cluster.missing()
    with pytest.raises(ClusterError, match="scripts/install-k8s"):
        cluster.up()
    cluster.down()  # nothing was created: nothing to do
