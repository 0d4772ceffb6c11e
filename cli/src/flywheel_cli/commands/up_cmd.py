"""`flywheel up`: run the whole system on this machine until Ctrl-C (optionally drive a simulation)."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from types import FrameType

from flywheel_cli.console import make_console
from flywheel_cli.local.options import add_stack_args, print_table, stack_config
from flywheel_cli.local.stack import DEFAULT_DATASET, LocalStack, StackError
from flywheel_cli.simulation.simulate_cmd import add_simulation_args, check_run_inputs, run_simulation


def _interrupt_on_sigterm() -> None:
    """SIGTERM stops `flywheel up` the way Ctrl-C does (KeyboardInterrupt, then an orderly stop)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _up(args: argparse.Namespace) -> int:
    config = stack_config(args, args.simulate, simulating=bool(args.simulate))
    check_run_inputs(args, Path(args.simulate) if args.simulate else None, config)
    console = make_console()
    _interrupt_on_sigterm()
    stack = LocalStack(config, echo=console.print)
    try:
        with stack:
            print_table(console, stack)
            if args.simulate:
                return run_simulation(args, stack, console, Path(args.simulate))
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


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Adds `up` to the flywheel command."""

    up = subparsers.add_parser(
        "up",
        help="run Kafka and every service locally until Ctrl-C",
        description="Starts the Kafka broker, prepares and registers the base model if needed, starts the "
        "inference, feedback, trainer and evaluator services and the gateway (the widget and the review "
        "console, for a browser), prints which port serves what and waits until each is healthy. "
        "Ctrl-C stops everything. With --simulate DIR it runs a simulation on the "
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
