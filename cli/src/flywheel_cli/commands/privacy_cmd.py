"""`flywheel privacy forget`: forget one visitor's session in the trainer and the evaluator (admin;
docs/security.md)."""

from __future__ import annotations

import argparse
import json
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from flywheel_cli.admin import add_token_arg, admin_metadata
from flywheel_proto.flywheel.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from flywheel_proto.flywheel.trainer.v1 import trainer_pb2, trainer_pb2_grpc


def _forget_live(
    args: argparse.Namespace, named: dict[str, str]
) -> tuple[evaluator_pb2.ForgetSessionResponse | None, str]:
    """The evaluator's forget, or why it failed."""
    request = evaluator_pb2.ForgetSessionRequest(**named)
    try:
        with grpc.insecure_channel(args.evaluator) as channel:
            stub = evaluator_pb2_grpc.EvaluatorServiceStub(channel)
            return stub.ForgetSession(request, timeout=args.timeout, metadata=admin_metadata(args)), ""
    except grpc.RpcError as exc:
        return None, f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]


def _print(
    trained: trainer_pb2.ForgetSessionResponse, live: evaluator_pb2.ForgetSessionResponse | None
) -> None:
    print(
        f"forgot the session: {trained.interactions} interactions, {trained.feedback} feedback, "
        f"{trained.examples} examples removed from the trainer's store (audit {trained.audit_id})"
    )
    for d in trained.datasets:
        print(f"  dataset {d.old_dataset_id} -> {d.new_dataset_id} ({d.removed_examples} records removed)")
    if trained.marked_versions:
        print(
            f"  trained on forgotten data (marked): {', '.join(trained.marked_versions)}; "
            "retrain from the replaced datasets to be rid of it"
        )
    if live is not None:
        print(f"  the evaluator's live signals: {live.votes} votes, {live.served} served rows removed")


def _forget(args: argparse.Namespace) -> int:
    named = {"session_pseudonym" if args.pseudonym else "session_id": args.session}
    # The trainer first: it holds the text. Both calls can be repeated, so after a failure the same
    # command finishes the job.
    with grpc.insecure_channel(args.target) as channel:
        trained = trainer_pb2_grpc.TrainerServiceStub(channel).ForgetSession(
            trainer_pb2.ForgetSessionRequest(reason=args.reason, **named),
            timeout=args.timeout,
            metadata=admin_metadata(args),
        )
    live, failure = _forget_live(args, named)
    if args.json:
        evaluator = MessageToDict(live) if live is not None else {"error": failure}
        print(json.dumps({"trainer": MessageToDict(trained), "evaluator": evaluator}, indent=2))
    else:
        _print(trained, live)
    if live is None:
        print(f"the evaluator ({args.evaluator}) did not forget the session: {failure}", file=sys.stderr)
        print("run the command again", file=sys.stderr)
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Adds `privacy forget` to the flywheel command."""
    privacy = subparsers.add_parser("privacy", help="data subjects' requests (admin)")
    privacy.add_argument("--target", default="127.0.0.1:50053", help="the trainer's gRPC address")
    privacy.add_argument("--evaluator", default="127.0.0.1:50054", help="the evaluator's gRPC address")
    privacy.add_argument("--timeout", type=float, default=300.0)
    commands = privacy.add_subparsers(dest="privacy_command", required=True)
    forget = commands.add_parser(
        "forget",
        help="remove a session's interactions, feedback and live votes from the stores and the datasets",
    )
    forget.add_argument(
        "--session", required=True, help="the visitor's session id (or, with --pseudonym, its pseudonym)"
    )
    forget.add_argument("--pseudonym", action="store_true", help="--session is the 32-hex-digit pseudonym")
    forget.add_argument("--reason", default="", help="why (a ticket reference), kept in the audit record")
    forget.add_argument("--json", action="store_true")
    add_token_arg(forget)
    forget.set_defaults(func=_forget)
