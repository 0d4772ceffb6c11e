"""`flywheel trainer jobs|job|trigger`: see the trainer's jobs and cut a batch now (admin)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import Literal

import grpc
from google.protobuf.json_format import MessageToDict

from flywheel_cli.admin import add_token_arg, admin_metadata
from flywheel_cli.flags import non_negative_int
from flywheel_proto.flywheel.trainer.v1 import trainer_pb2, trainer_pb2_grpc

_STATES = {
    trainer_pb2.JOB_STATE_QUEUED: "queued",
    trainer_pb2.JOB_STATE_RUNNING: "running",
    trainer_pb2.JOB_STATE_SUCCEEDED: "succeeded",
    trainer_pb2.JOB_STATE_FAILED: "failed",
}


def _when(job: trainer_pb2.Job, field: Literal["created_at", "started_at", "finished_at"]) -> str:
    if not job.HasField(field):
        return "-"
    stamp = getattr(job, field).ToDatetime(tzinfo=dt.UTC)
    return stamp.strftime("%Y-%m-%d %H:%M:%S")


def _duration(job: trainer_pb2.Job) -> str:
    if not job.HasField("started_at"):
        return "-"
    started = job.started_at.ToDatetime(tzinfo=dt.UTC)
    end = dt.datetime.now(dt.UTC)
    if job.HasField("finished_at"):
        end = job.finished_at.ToDatetime(tzinfo=dt.UTC)
    return f"{(end - started).total_seconds():.0f} s"


def _call(args: argparse.Namespace, fn: str, request: object, **kwargs: object) -> object:
    with grpc.insecure_channel(args.target) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        return getattr(stub, fn)(request, timeout=args.timeout, **kwargs)


def _jobs(args: argparse.Namespace) -> int:
    response = _call(args, "ListJobs", trainer_pb2.ListJobsRequest(limit=args.limit))
    assert isinstance(response, trainer_pb2.ListJobsResponse)
    if args.json:
        print(json.dumps(MessageToDict(response), indent=2))
        return 0
    print(f"{'job':34} {'state':10} {'examples':>8} {'base':6} {'candidate':9} {'created (UTC)':19} duration")
    for job in response.jobs:
        print(
            f"{job.job_id:34} {_STATES.get(job.state, '?'):10} {job.examples:>8} {job.base_version or '-':6} "
            f"{job.candidate_version or '-':9} {_when(job, 'created_at'):19} {_duration(job)}"
        )
        if job.reason:
            print(f"  {job.reason}")
    return 0


def _job(args: argparse.Namespace) -> int:
    job = _call(args, "GetJob", trainer_pb2.GetJobRequest(job_id=args.job_id))
    assert isinstance(job, trainer_pb2.Job)
    print(json.dumps(MessageToDict(job), indent=2))
    return 0


def _trigger(args: argparse.Namespace) -> int:
    response = _call(args, "TriggerBatch", trainer_pb2.TriggerBatchRequest(), metadata=admin_metadata(args))
    assert isinstance(response, trainer_pb2.TriggerBatchResponse)
    if not response.job_id:
        print("no training example is waiting: nothing to cut")
    else:
        print(f"cut dataset {response.dataset_id}; job {response.job_id} queued")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Adds `trainer jobs|job|trigger` to the flywheel command."""
    trainer = subparsers.add_parser("trainer", help="the trainer's jobs; cut a batch now")
    trainer.add_argument("--target", default="127.0.0.1:50053", help="the trainer's gRPC address")
    trainer.add_argument("--timeout", type=float, default=30.0)
    commands = trainer.add_subparsers(dest="trainer_command", required=True)
    jobs = commands.add_parser("jobs", help="list training jobs, newest first")
    jobs.add_argument("--limit", type=non_negative_int, default=20, help="at most this many (0: all)")
    jobs.add_argument("--json", action="store_true")
    jobs.set_defaults(func=_jobs)
    job = commands.add_parser("job", help="one job, as JSON")
    job.add_argument("job_id")
    job.set_defaults(func=_job)
    trigger = commands.add_parser("trigger", help="cut a batch of the waiting examples now (admin)")
    add_token_arg(trigger)
    trigger.set_defaults(func=_trigger)
