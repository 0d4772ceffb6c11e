"""The `flywheel` command: one entry point for preparing models, running and driving the system."""

from __future__ import annotations

import argparse
import logging
import sys

from flywheel_cli.commands import (
    ask_cmd,
    cluster_cmd,
    feedback_cmd,
    kafka_cmd,
    model_cmd,
    privacy_cmd,
    rollout_cmd,
    trainer_cmd,
    up_cmd,
)
from flywheel_cli.errors import explain
from flywheel_cli.simulation import simulate_cmd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flywheel", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in (model_cmd, ask_cmd, kafka_cmd, feedback_cmd, up_cmd, simulate_cmd, rollout_cmd):
        module.register(subparsers)
    trainer_cmd.register(subparsers)
    privacy_cmd.register(subparsers)
    cluster_cmd.register(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    if not args.verbose:
        # kafka-python logs each refused connection; the CLI says once what to do about it.
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
    try:
        return int(args.func(args))
    except Exception as exc:
        message = explain(exc, args)
        if message is None:
            raise
        print(f"flywheel {args.command}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
