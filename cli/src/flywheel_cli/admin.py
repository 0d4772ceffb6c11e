"""The admin bearer token that the CLI's admin commands send (rollout, trainer trigger, privacy)."""

from __future__ import annotations

import argparse
import os

DEV_ADMIN_TOKEN = "dev-admin-token"


def add_token_arg(parser: argparse.ArgumentParser) -> None:
    """Adds `--token` to an admin command."""
    parser.add_argument(
        "--token", help="admin bearer token (default: $FLYWHEEL_ADMIN_TOKEN, else the development token)"
    )


def admin_metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """gRPC metadata with the admin token: `--token`, else $FLYWHEEL_ADMIN_TOKEN, else the development one."""
    token = args.token or os.environ.get("FLYWHEEL_ADMIN_TOKEN") or DEV_ADMIN_TOKEN
    return (("authorization", f"Bearer {token}"),)
