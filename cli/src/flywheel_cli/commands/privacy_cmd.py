"""`flywheel privacy forget`: forget one visitor's session in the trainer (admin; docs/security.md)."""

from __future__ import annotations

import argparse
import json

import grpc
from google.protobuf.json_format import MessageToDict

from flywheel_cli.admin import add_token_arg, admin_metadata
from flywheel_proto.flywheel.trainer.v1 import trainer_pb2, trainer_pb2_grpc


def _forget(args: argparse.Namespace) -> int:
    if args.pseudonym:
        request = trainer_pb2.ForgetSessionRequest(session_pseudonym=args.session, reason=args.reason)
    else:
        request = trainer_pb2.ForgetSessionRequest(session_id=args.session, reason=args.reason)
    with grpc.insecure_channel(args.target) as channel:
        response = trainer_pb2_grpc.TrainerServiceStub(channel).ForgetSession(
            request, timeout=args.timeout, metadata=admin_metadata(args)
        )
    if args.json:
        print(json.dumps(MessageToDict(response), indent=2))
        return 0
    print(
        f"forgot the session: {response.interactions} interactions, {response.feedback} feedback, "
        f"{response.examples} examples removed from the trainer's store (audit {response.audit_id})"
    )
    for d in response.datasets:
        print(f"  dataset {d.old_dataset_id} -> {d.new_dataset_id} ({d.removed_examples} records removed)")
    if response.marked_versions:
        print(
            f"  trained on forgotten data (marked): {', '.join(response.marked_versions)}; "
            "retrain from the replaced datasets to be rid of it"
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Adds `privacy forget` to the flywheel command."""
    privacy = subparsers.add_parser("privacy", help="data subjects' requests (admin)")
    privacy.add_argument("--target", default="127.0.0.1:50053", help="the trainer's gRPC address")
    privacy.add_argument("--timeout", type=float, default=300.0)
    commands = privacy.add_subparsers(dest="privacy_command", required=True)
    forget = commands.add_parser(
        "forget", help="remove a session's interactions and feedback from the store and the datasets"
    )
    forget.add_argument(
        "--session", required=True, help="the visitor's session id (or, with --pseudonym, its pseudonym)"
    )
    forget.add_argument("--pseudonym", action="store_true", help="--session is the 32-hex-digit pseudonym")
    forget.add_argument("--reason", default="", help="why (a ticket reference), kept in the audit record")
    forget.add_argument("--json", action="store_true")
    add_token_arg(forget)
    forget.set_defaults(func=_forget)
