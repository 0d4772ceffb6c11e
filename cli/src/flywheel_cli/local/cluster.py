"""A local Kubernetes control plane from binaries: KWOK's kwokctl runs etcd, kube-apiserver,
kube-controller-manager and kube-scheduler, and KWOK fakes the kubelets of a CPU and a GPU pool.

The binaries come from scripts/install-k8s (`.cache/tools/k8s`). No container ever runs: KWOK moves
pods through their lifecycle by the stages in tools/k8s/kwok.yaml (Ready; a Job's pod Succeeded, or
Failed when annotated `flywheel.io/kwok-outcome: failed`; a `helm test` pod Succeeded).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flywheel_common.files import cache_root, repo_root

# Components kwokctl starts, each a link to the one binary scripts/install-k8s builds.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
# The annotation KWOK's own stages use to tell a fake node from a real one.
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"
POOL_LABEL = "flywheel.io/pool"


class ClusterError(RuntimeError):
    """The local control plane could not be started, reached or stopped."""


def k8s_home() -> Path:
    """Where scripts/install-k8s puts the binaries (bin/) and the CRDs the chart uses (crds/)."""
    return cache_root() / "tools" / "k8s"


@dataclass(frozen=True)
class NodePool:
    """Fake nodes of one kind: capacity, labels and taints as a cloud's node pool would have them."""

    name: str
    count: int
    cpu: str
    memory: str
    gpus: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: Sequence[Mapping[str, str]] = ()

    def node_names(self) -> list[str]:
        return [f"{self.name}-{i}" for i in range(self.count)]

    def nodes(self) -> list[dict[str, object]]:
        capacity = {"cpu": self.cpu, "memory": self.memory, "pods": "110"}
        if self.gpus:
            capacity[GPU_RESOURCE] = str(self.gpus)
        return [
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {KWOK_NODE_ANNOTATION: "fake"},
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "type": "kwok",
                        POOL_LABEL: self.name,
                        **self.labels,
                    },
                },
                "spec": {"taints": [dict(t) for t in self.taints]},
                "status": {"capacity": capacity, "allocatable": capacity},
            }
            for name in self.node_names()
        ]


# The GPU pool carries the labels a GKE L4 pool and the NVIDIA GPU Operator set (the chart's gpuPool
# selects either) and the taint GPU pools get, so only pods that tolerate it land there.
DEFAULT_POOLS = (
    NodePool("cpu", 2, cpu="32", memory="128Gi"),
    NodePool(
        "gpu",
        2,
        cpu="32",
        memory="192Gi",
        gpus=4,
        labels={"cloud.google.com/gke-accelerator": "nvidia-l4", "nvidia.com/gpu.present": "true"},
        taints=({"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"},),
    ),
)


class LocalCluster:
    """One kwokctl cluster: `up()` starts it and its node pools, `down()` deletes it and its data."""

    def __init__(
        self,
        name: str = "flywheel",
        *,
        workdir: Path | None = None,
        home: Path | None = None,
        pools: Sequence[NodePool] = DEFAULT_POOLS,
    ) -> None:
        self.name = name
        self.home = home or k8s_home()
        self.bin_dir = self.home / "bin"
        self.workdir = workdir or repo_root() / "var" / "k8s"
        self.kubeconfig = self.workdir / f"{name}.kubeconfig"
        self.pools = tuple(pools)

    def missing(self) -> list[str]:
        """The binaries that are not installed (empty when scripts/install-k8s ran)."""
        names = (*COMPONENTS, "kubectl", "kwok", "kwokctl")
        return [n for n in names if not os.access(self.bin_dir / n, os.X_OK)]

    def _env(self) -> dict[str, str]:
        # kwokctl keeps each cluster's PKI, logs and pids under KWOK_WORKDIR/clusters/<name>.
        return {**os.environ, "KWOK_WORKDIR": str(self.workdir / "kwok")}

    def _run(self, args: Sequence[str], *, stdin: str | None = None, timeout: float = 300) -> str:
        try:
            done = subprocess.run(
                list(args),
                input=stdin,
                capture_output=True,
                text=True,
                env=self._env(),
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"{Path(args[0]).name} {args[1]} did not finish in {timeout:.0f} s") from exc
        if done.returncode != 0:
            raise ClusterError(
                f"{Path(args[0]).name} {' '.join(args[1:3])} failed: {done.stderr.strip()[-2000:]}"
            )
        return done.stdout

    def kwokctl(self, *args: str, timeout: float = 300) -> str:
        return self._run([str(self.bin_dir / "kwokctl"), "--name", self.name, *args], timeout=timeout)

    def kubectl(self, *args: str, stdin: str | None = None, timeout: float = 120) -> str:
        """kubectl with the cluster's admin kubeconfig."""
        cmd = [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        return self._run(cmd, stdin=stdin, timeout=timeout)

    def running(self) -> bool:
        """Whether the API server answers with this cluster's kubeconfig."""
        if not self.kubeconfig.is_file():
            return False
        try:
            self.kubectl("get", "--raw", "/readyz", timeout=10)
        except ClusterError:
            return False
        return True

    def up(self, *, timeout_s: float = 300) -> None:
        """Starts the control plane (kept when already running), adds the node pools and the CRDs
        the chart's optional resources need, and waits until every node is Ready."""
        missing = self.missing()
        if missing:
            raise ClusterError(f"not installed: {', '.join(missing)} (run scripts/install-k8s)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.running():
            binaries = [f"--{c}-binary={self.bin_dir / c}" for c in COMPONENTS]
            self.kwokctl(
                "create",
                "cluster",
                "--runtime=binary",
                f"--kubeconfig={self.kubeconfig}",
                f"--config={repo_root() / 'tools' / 'k8s' / 'kwok.yaml'}",
                *binaries,
                f"--kwok-controller-binary={self.bin_dir / 'kwok'}",
                # RBAC and admission on, as in a real cluster: the trainer's Role must be enough.
                "--kube-authorization=true",
                "--kube-admission=true",
                "--quiet-pull",
                f"--wait={int(timeout_s)}s",
                f"--timeout={int(timeout_s)}s",
                timeout=timeout_s + 60,
            )
        nodes = [node for pool in self.pools for node in pool.nodes()]
        self.kubectl(
            "apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": nodes})
        )
        crds = sorted((self.home / "crds").glob("*.yaml"))
        for crd in crds:
            self.kubectl("apply", "--server-side", "-f", str(crd))
        if crds:
            self.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        self.wait_nodes_ready(timeout_s=timeout_s)

    def wait_nodes_ready(self, *, timeout_s: float) -> None:
        names = {name for pool in self.pools for name in pool.node_names()}
        deadline = time.monotonic() + timeout_s
        while True:
            ready = self._ready_nodes()
            if names <= ready:
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"nodes not Ready after {timeout_s:.0f} s: {sorted(names - ready)}")
            time.sleep(1.0)

    def _ready_nodes(self) -> set[str]:
        doc = json.loads(self.kubectl("get", "nodes", "-o", "json"))
        ready: set[str] = set()
        for node in doc["items"]:
            conditions = node.get("status", {}).get("conditions") or []
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                ready.add(node["metadata"]["name"])
        return ready

    def down(self) -> None:
        """Stops every component and deletes the cluster's data (nothing happens when it is absent)."""
        if not (self.workdir / "kwok" / "clusters" / self.name).exists():
            return
        self.kwokctl("delete", "cluster", f"--kubeconfig={self.kubeconfig}", timeout=120)
        self.kubeconfig.unlink(missing_ok=True)
