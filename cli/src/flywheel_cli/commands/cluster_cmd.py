"""`flywheel cluster up|down|status`: a local Kubernetes control plane with KWOK's fake node pools."""

from __future__ import annotations

import argparse
from pathlib import Path

from flywheel_cli.local.cluster import LocalCluster


def _cluster(args: argparse.Namespace) -> LocalCluster:
    return LocalCluster(args.name, workdir=Path(args.workdir) if args.workdir else None)


def _up(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    cluster.up(timeout_s=args.timeout)
    print(cluster.kubectl("get", "nodes", "-L", "flywheel.io/pool").rstrip())
    print(f"cluster {cluster.name} is up; use it with: export KUBECONFIG={cluster.kubeconfig}")
    print(f"kubectl and helm: {cluster.bin_dir}/kubectl, .cache/tools/bin/helm")
    return 0


def _down(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    cluster.down()
    print(f"cluster {cluster.name} is down")
    return 0


def _status(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    if not cluster.running():
        print(f"cluster {cluster.name} is not running")
        return 1
    print(cluster.kubectl("get", "nodes", "-L", "flywheel.io/pool").rstrip())
    print(f"KUBECONFIG={cluster.kubeconfig}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Adds `cluster up|down|status` to the flywheel command."""
    cluster = subparsers.add_parser(
        "cluster", help="a local Kubernetes control plane (binaries from scripts/install-k8s, KWOK nodes)"
    )
    commands = cluster.add_subparsers(dest="cluster_command", required=True)
    for name, func, text in (
        (
            "up",
            _up,
            "start etcd, the API server, controller manager, scheduler and a CPU and a GPU node pool",
        ),
        ("down", _down, "stop every component and delete the cluster's data"),
        ("status", _status, "list the nodes (exit 1 when the cluster is not running)"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--name", default="flywheel", help="cluster name (default flywheel)")
        sub.add_argument("--workdir", help="state and kubeconfig folder (default var/k8s)")
        if name == "up":
            sub.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for Ready nodes")
        sub.set_defaults(func=func)
