"""The flags that place a local stack, its configuration from them, and the table of what it runs."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flywheel_cli.local.prometheus import PrometheusOptions
from flywheel_cli.local.stack import DEFAULT_DATASET, LocalStack, StackConfig
from flywheel_model.prepare import SERVED_BASE_MODEL


def add_stack_args(parser: argparse.ArgumentParser) -> None:
    """Flags that say where the local stack lives and which broker it uses."""
    parser.add_argument(
        "--var", default="var", help="state folder: artifacts, logs, broker data (default var)"
    )
    parser.add_argument(
        "--kafka",
        metavar="HOST:PORT",
        help="use this Kafka broker (default: the one on 127.0.0.1:9092, started if none listens)",
    )
    parser.add_argument(
        "--golden",
        metavar="DIR",
        help="dataset whose `gate` split the evaluator gates on (default: the simulated one)",
    )
    parser.add_argument(
        "--free-ports",
        action="store_true",
        help="pick free ports instead of 50051-50054, 8080 / 9101-9105 (and 9090 for --observe)",
    )
    parser.add_argument(
        "--observe",
        action="store_true",
        help="also start Prometheus (from scripts/install-deploy-tools) on 127.0.0.1:9090: it scrapes every "
        "service and evaluates the Helm chart's alert rules; it stops with the stack",
    )
    parser.add_argument(
        "--base-model",
        metavar="SOURCE",
        default=SERVED_BASE_MODEL,
        help=f"base model to prepare and register: {SERVED_BASE_MODEL} (default; Gemma Terms of Use), "
        "smollm2-135m (Apache 2.0), a .gguf file or a Hugging Face folder; see docs/inference.md",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "int4", "gguf", "gguf_a8"],
        help="how the base model is exported (default fp32): gguf stores a GGUF's own blocks (exact, "
        "faster for one stream), gguf_a8 multiplies them with 8-bit activations; see docs/inference.md",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="with a simulation: go on from the state in --var (registry, trainer store, broker) instead "
        "of a clean state in VAR/runs/<time>/, so the base row is the model that serves now",
    )


def stack_flags_given(args: argparse.Namespace) -> list[str]:
    """The stack flags set to something other than their defaults (they mean nothing without a stack)."""
    probe = argparse.ArgumentParser()
    add_stack_args(probe)
    defaults = vars(probe.parse_args([]))
    given = [dest for dest, default in defaults.items() if getattr(args, dest, default) != default]
    return [f"--{dest.replace('_', '-')}" for dest in given]


def stack_config(
    args: argparse.Namespace, dataset: Path | str | None, *, simulating: bool = False
) -> StackConfig:
    """The stack's configuration from the stack flags; the evaluator gates on `--golden`, else `dataset`.

    A simulation starts from a clean state of its own (a new folder under VAR/runs/ and a broker of its
    own), so two runs of the same command are comparable, unless `--resume` or `--kafka` says otherwise.
    """
    fresh = simulating and not args.resume and not args.kafka
    var_dir = Path(args.var) / "runs" / time.strftime("%Y%m%d-%H%M%S") if fresh else Path(args.var)
    return StackConfig(
        var_dir=var_dir,
        kafka_bootstrap=args.kafka,
        dataset=Path(args.golden or dataset or DEFAULT_DATASET),
        free_ports=args.free_ports,
        own_broker=fresh,
        base_model=args.base_model,
        precision=args.precision,
        observe=PrometheusOptions() if args.observe else None,
    )


def print_table(console: Console, stack: LocalStack) -> None:
    """Which port serves what, and where each service logs."""
    table = Table(title="Flywheel is running", title_justify="left")
    for column in ("service", "address", "/metrics", "log", "what it does"):
        table.add_column(column, no_wrap=column != "what it does")
    for row in stack.table_rows():
        table.add_row(*row)
    console.print(table)
    if stack.skipped:
        console.print(f"[yellow]not installed here, not started:[/] {', '.join(stack.skipped)}")
    console.print("gRPC services answer health checks (grpc.health.v1); /metrics is Prometheus over HTTP.")
    if stack.gateway_url:
        url = stack.gateway_url
        console.print(
            f"[bold]In a browser:[/] {url}/demo/ (the dataset's pages with the widget), "
            f"{url}/console (the review console; development expert token: dev-expert-token)"
        )
