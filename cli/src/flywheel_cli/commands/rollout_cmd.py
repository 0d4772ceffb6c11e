"""`flywheel rollout ...`: the evaluator's admin CLI (status, decisions, reports, promote, roll back, pin)."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from typing import Any

import grpc

from flywheel_cli.admin import add_token_arg, admin_metadata
from flywheel_cli.decisions import action_name, decision_json
from flywheel_cli.errors import UserError, explain
from flywheel_cli.flags import non_negative_int
from flywheel_proto.flywheel.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc


def _print_rollout(rollout: evaluator_pb2.Rollout, history: int) -> None:
    canary = f"{rollout.canary} at {rollout.canary_fraction:.0%}" if rollout.canary else "none"
    print(f"production:   {rollout.production or '(none)'}")
    print(f"canary:       {canary}")
    print(f"pinned:       {'yes' if rollout.pinned else 'no'}")
    print(f"auto-rollout: {'on' if rollout.auto_rollout else 'off'}")
    if history and rollout.history:
        print("history:")
        for line in rollout.history[-history:]:
            print(f"  {line}")


def _print_decision(d: evaluator_pb2.Decision, verbose: bool) -> None:
    when = d.created_at.ToDatetime().isoformat(timespec="seconds") if d.created_at.seconds else ""
    outcome = "passed" if d.passed else "failed"
    against = f" vs {d.baseline_version}" if d.baseline_version else ""
    print(f"{when}  {action_name(d.action):17} {d.version}{against}: {outcome}")
    for reason in d.reasons if verbose else d.reasons[:2]:
        print(f"    {reason}")


def _run(args: argparse.Namespace) -> int:
    metadata = admin_metadata(args)
    args.request_id = getattr(args, "request_id", "") or uuid.uuid4().hex
    with grpc.insecure_channel(args.target) as channel:
        stub = evaluator_pb2_grpc.EvaluatorServiceStub(channel)
        try:
            return int(_call(stub, args, metadata))
        except grpc.RpcError as err:
            if args.rollout_command not in ("promote", "rollback"):
                raise
            # The move may have been applied before the call failed: the same id makes a retry safe.
            retry = f"retry with --request-id {args.request_id} to apply the move at most once"
            raise UserError(f"{explain(err, args)}; {retry}") from err


def _call(stub: evaluator_pb2_grpc.EvaluatorServiceStub, args: argparse.Namespace, metadata: Any) -> int:
    timeout = args.timeout
    command = args.rollout_command
    if command == "status":
        _print_rollout(stub.GetRollout(evaluator_pb2.GetRolloutRequest(), timeout=timeout), args.history)
    elif command == "decisions":
        reply = stub.ListDecisions(evaluator_pb2.ListDecisionsRequest(limit=args.limit), timeout=timeout)
        if args.json:
            print(json.dumps([decision_json(d) for d in reply.decisions], indent=2))
        for d in [] if args.json else reply.decisions:
            _print_decision(d, args.all_reasons)
    elif command in ("report", "evaluate"):
        if command == "report":
            report = stub.GetReport(evaluator_pb2.GetReportRequest(version=args.version), timeout=timeout)
        else:
            print(f"evaluating {args.version} on the golden set (minutes on a CPU) ...", file=sys.stderr)
            report = stub.Evaluate(
                evaluator_pb2.EvaluateRequest(version=args.version),
                metadata=metadata,
                timeout=max(timeout, 1800.0),
            )
        if args.json:
            metrics = {
                k: {"value": m.value, "ci_low": m.ci_low, "ci_high": m.ci_high}
                for k, m in report.metrics.items()
            }
            print(
                json.dumps({"version": report.version, "golden_set": report.golden_set, "metrics": metrics})
            )
        else:
            print(report.summary)
    else:
        request = evaluator_pb2.VersionRequest(
            version=getattr(args, "version", "") or "", reason=args.reason, request_id=args.request_id
        )
        if command == "promote":
            rollout = stub.Promote(request, metadata=metadata, timeout=timeout)
        elif command == "rollback":
            rollout = stub.Rollback(request, metadata=metadata, timeout=timeout)
        elif command == "pin":
            rollout = stub.Pin(request, metadata=metadata, timeout=timeout)
        elif command == "unpin":
            unpin = evaluator_pb2.VersionRequest(reason=args.reason)
            rollout = stub.Pin(unpin, metadata=metadata, timeout=timeout)
        else:
            enabled = args.state == "on"
            rollout = stub.SetAutoRollout(
                evaluator_pb2.SetAutoRolloutRequest(enabled=enabled), metadata=metadata, timeout=timeout
            )
        _print_rollout(rollout, 0)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Adds `rollout` to the flywheel command."""
    rollout = subparsers.add_parser(
        "rollout", help="the evaluator: rollout status, gate decisions, reports; promote, roll back, pin"
    )
    rollout.add_argument("--target", default="127.0.0.1:50054", help="the evaluator (default %(default)s)")
    add_token_arg(rollout)
    rollout.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default %(default)s)")
    rollout.set_defaults(func=_run)
    commands = rollout.add_subparsers(dest="rollout_command", required=True)
    status = commands.add_parser("status", help="production, canary and split, pin, auto-rollout")
    status.add_argument("--history", type=int, default=10, help="recent state changes to show")
    decisions = commands.add_parser("decisions", help="gate, canary and admin decisions, newest first")
    decisions.add_argument("--limit", type=non_negative_int, default=20)
    # Its own dest: sharing `verbose` with the global -v would reset that one to False.
    decisions.add_argument("-v", "--verbose", dest="all_reasons", action="store_true", help="every reason")
    decisions.add_argument("--json", action="store_true")
    for name, text in (
        ("report", "a version's evaluation report (Markdown)"),
        ("evaluate", "admin: evaluate a version on the golden set now"),
    ):
        cmd = commands.add_parser(name, help=text)
        cmd.add_argument("version")
        cmd.add_argument("--json", action="store_true", help="the metrics as JSON")
    promote = commands.add_parser("promote", help="admin: make a version (default: the canary) production")
    promote.add_argument("version", nargs="?", default="")
    back = commands.add_parser(
        "rollback",
        help="admin: serve an earlier version (default: end the canary, else the previous production)",
    )
    back.add_argument("version", nargs="?", default="")
    pin = commands.add_parser("pin", help="admin: pin production to a version (automatic rollout stops)")
    pin.add_argument("version")
    commands.add_parser("unpin", help="admin: unpin (automatic rollout resumes)")
    auto = commands.add_parser("auto", help="admin: stop or resume automatic rollout")
    auto.add_argument("state", choices=["on", "off"])
    for cmd in (promote, back, pin, commands.choices["unpin"]):
        cmd.add_argument("--reason", default="", help="recorded with the decision")
    for cmd in (promote, back):
        cmd.add_argument(
            "--request-id",
            default="",
            help="repeat a call that failed with the id it printed: the move is applied once (default: new)",
        )
    auto.set_defaults(reason="")
