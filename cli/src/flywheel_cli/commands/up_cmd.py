"""`flywheel up`: run the whole system on this machine until Ctrl-C (optionally drive a simulation)."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.table import Table

from flywheel_cli.local.stack import DEFAULT_DATASET, LocalStack, StackConfig, StackError


def stack_config(args: argparse.Namespace) -> StackConfig:
    """The stack's configuration from `flywheel up` / `flywheel simulate --up` flags."""
    return StackConfig(
        var_dir=Path(args.var),
        kafka_bootstrap=args.kafka,
        dataset=Path(
            args.golden
            or getattr(args, "dataset", None)
            or getattr(args, "simulate", None)
            or DEFAULT_DATASET
        ),
        free_ports=args.free_ports,
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


def _interrupt_on_sigterm() -> None:
    """SIGTERM stops `flywheel up` the way Ctrl-C does (KeyboardInterrupt, then an orderly stop)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def make_console() -> Console:
    """Rich's console; into a file or a pipe, wide enough that the report's table does not wrap."""
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 160))


def _up(args: argparse.Namespace) -> int:
    console = make_console()
    _interrupt_on_sigterm()
    config = stack_config(args)
    stack = LocalStack(config, echo=console.print)
    try:
        with stack:
            print_table(console, stack)
            if args.simulate:
                from flywheel_cli.simulation.simulate_cmd import run_simulation

                return run_simulation(args, stack, console)
            console.print("[bold]All services SERVING.[/] Press Ctrl-C to stop.")
            console.print(
                "Try: uv run flywheel simulate --dataset datasets/python-faq --rounds 1   "
                "(in another terminal)"
            )
            stopped = threading.Event()
            while not stopped.wait(1.0):
                dead = stack.exited()
                if dead:
                    for service in dead:
                        console.print(
                            f"[red]{service.spec.name} exited with {service.process.returncode}[/]; "
                            f"see {service.log_file}"
                        )
                    return 1
    except KeyboardInterrupt:
        console.print("stopping ...")
    except StackError as exc:
        console.print(f"[red]could not start the stack:[/] {exc}")
        return 1
    finally:
        if not stack.running:
            console.print("stopped")
    return 0


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
        "--free-ports", action="store_true", help="pick free ports instead of 50051-50054 / 9101-9104"
    )


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Adds `up` to the flywheel command."""
    from flywheel_cli.simulation.simulate_cmd import add_simulation_args

    up = subparsers.add_parser(
        "up",
        help="run Kafka and every service locally until Ctrl-C",
        description="Starts the Kafka broker, prepares and registers the base model if needed, starts the "
        "inference, feedback, trainer and evaluator services, prints which port serves what and waits "
        "until each is healthy. Ctrl-C stops everything. With --simulate DIR it runs a simulation on the "
        "dataset, prints where the report is, and stops.",
    )
    add_stack_args(up)
    up.add_argument(
        "--simulate",
        metavar="DIR",
        nargs="?",
        const=str(DEFAULT_DATASET),
        help="once healthy, run `flywheel simulate` on this dataset (default datasets/python-faq), then stop",
    )
    add_simulation_args(up, dataset_flag=False, default_rounds=1)
    up.set_defaults(func=_up)
