"""The TrainerService: list and get training jobs; cut a batch now (admin only)."""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from flywheel_common.auth import Authenticator, Role
from flywheel_common.errors import InvalidArgument, NotFound
from flywheel_common.grpc_server import request_metadata
from flywheel_proto.flywheel.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from flywheel_trainer.store import FAILED, QUEUED, RUNNING, SUCCEEDED, Job
from flywheel_trainer.trainer import Trainer

_STATES = {
    QUEUED: trainer_pb2.JOB_STATE_QUEUED,
    RUNNING: trainer_pb2.JOB_STATE_RUNNING,
    SUCCEEDED: trainer_pb2.JOB_STATE_SUCCEEDED,
    FAILED: trainer_pb2.JOB_STATE_FAILED,
}


def _ts(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def job_message(job: Job) -> trainer_pb2.Job:
    """A stored job as the API shows it."""
    return trainer_pb2.Job(
        job_id=job.job_id,
        dataset_id=job.dataset_id,
        base_version=job.base_version,
        state=_STATES[job.state],
        reason=job.reason,
        candidate_version=job.candidate_version,
        examples=job.examples,
        created_at=_ts(job.created_at),
        started_at=_ts(job.started_at),
        finished_at=_ts(job.finished_at),
        launcher=job.launcher,
    )


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """Reads jobs from the store; TriggerBatch cuts through the trainer (same loop, no race)."""

    def __init__(self, trainer: Trainer, authenticator: Authenticator) -> None:
        self._trainer = trainer
        self._auth = authenticator

    async def ListJobs(
        self, request: trainer_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.ListJobsResponse:
        """Jobs, newest first."""
        jobs = self._trainer.store.jobs(limit=request.limit)
        return trainer_pb2.ListJobsResponse(jobs=[job_message(j) for j in jobs])

    async def GetJob(
        self, request: trainer_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.Job:
        """One job by id."""
        if not request.job_id:
            raise InvalidArgument("job_id is required")
        job = self._trainer.store.job(request.job_id)
        if job is None:
            raise NotFound(f"no job {request.job_id}")
        return job_message(job)

    async def TriggerBatch(
        self, request: trainer_pb2.TriggerBatchRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.TriggerBatchResponse:
        """Cuts a batch of whatever waits now (admin only); empty when nothing waits."""
        self._auth.authenticate(request_metadata(context)).require(Role.ADMIN)
        cut = await self._trainer.cut("manual")
        if cut is None:
            return trainer_pb2.TriggerBatchResponse()
        return trainer_pb2.TriggerBatchResponse(dataset_id=cut.dataset_id, job_id=cut.job_id)
