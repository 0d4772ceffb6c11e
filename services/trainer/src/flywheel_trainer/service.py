"""The TrainerService: training jobs, a batch now (admin only), the review queue (expert or admin)."""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from flywheel_common.auth import Authenticator, Principal, Role
from flywheel_common.errors import FailedPrecondition, FlywheelError, InvalidArgument, NotFound
from flywheel_common.grpc_server import request_metadata
from flywheel_common.pseudonym import session_to_forget
from flywheel_proto.flywheel.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from flywheel_trainer.store import (
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Job,
    NeedsNoReview,
    ReviewItem,
    ReviewReason,
)
from flywheel_trainer.trainer import WAITING_FOR_BASE, Trainer

# ListJobs answers at most this many jobs; a limit of 0 means this many.
MAX_LIST = 100
MAX_JOB_ID_CHARS = 128
# What a caller without the admin role reads instead of a failed job's reason (exception text can
# name paths, hosts and internals); the trainer's log has the detail under the job id.
FAILED_REASON = "the job failed; the trainer's log has the details under this job id"

_STATES = {
    QUEUED: trainer_pb2.JOB_STATE_QUEUED,
    RUNNING: trainer_pb2.JOB_STATE_RUNNING,
    SUCCEEDED: trainer_pb2.JOB_STATE_SUCCEEDED,
    FAILED: trainer_pb2.JOB_STATE_FAILED,
}


_REASONS = {
    ReviewReason.LOW_RATING: trainer_pb2.REVIEW_REASON_LOW_RATING,
    ReviewReason.THUMBS_DOWN: trainer_pb2.REVIEW_REASON_THUMBS_DOWN,
    ReviewReason.COMMENT: trainer_pb2.REVIEW_REASON_COMMENT,
    ReviewReason.CANARY: trainer_pb2.REVIEW_REASON_CANARY,
}
_MAX_QUERY_ID_CHARS = 512
_REVIEWED = "this answer is already reviewed or needs no review"
MAX_REASON_CHARS = 1000


def _ts(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def public_reason(job: Job) -> str:
    """The job's reason as any caller may read it: fixed texts only, never exception detail."""
    if job.state == FAILED:
        return FAILED_REASON
    return job.reason if job.reason == WAITING_FOR_BASE else ""


def job_message(job: Job, *, detail: bool = False) -> trainer_pb2.Job:
    """A stored job as the API shows it; `detail` (admin callers) shows the stored reason itself."""
    return trainer_pb2.Job(
        job_id=job.job_id,
        dataset_id=job.dataset_id,
        base_version=job.base_version,
        state=_STATES[job.state],
        reason=job.reason if detail else public_reason(job),
        candidate_version=job.candidate_version,
        examples=job.examples,
        created_at=_ts(job.created_at),
        started_at=_ts(job.started_at),
        finished_at=_ts(job.finished_at),
        launcher=job.launcher,
    )


def review_item_message(item: ReviewItem) -> trainer_pb2.ReviewItem:
    """A stored review item as the API shows it."""
    return trainer_pb2.ReviewItem(
        query_id=item.query_id,
        question=item.question,
        answer=item.answer,
        passages=item.passages,
        page_url=item.page_url,
        page_title=item.page_title,
        model_version=item.model_version,
        reasons=[_REASONS[r] for r in item.reasons],
        lowest_rating=item.lowest_rating,
        thumbs_down=item.thumbs_down,
        comments=item.comments,
        times_asked=item.times_asked,
        impact=item.impact,
        answered_at=_ts(item.answered_at),
        last_feedback_at=_ts(item.last_feedback_at),
        claimed_by_caller=item.claimed_until is not None,
        claimed_until=_ts(item.claimed_until),
    )


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """Reads jobs from the store; TriggerBatch cuts through the trainer (same loop, no race)."""

    def __init__(self, trainer: Trainer, authenticator: Authenticator, pseudonym_key: bytes) -> None:
        self._trainer = trainer
        self._auth = authenticator
        self._pseudonym_key = pseudonym_key

    def _is_admin(self, context: grpc.aio.ServicerContext) -> bool:
        metadata = request_metadata(context)
        if "authorization" not in metadata:
            return False
        try:
            return self._auth.authenticate(metadata).role == Role.ADMIN
        except FlywheelError:
            return False  # reads are open: a bad token only means no detail

    async def ListJobs(
        self, request: trainer_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.ListJobsResponse:
        """Jobs, newest first, at most MAX_LIST."""
        jobs = self._trainer.store.jobs(limit=min(request.limit or MAX_LIST, MAX_LIST))
        detail = self._is_admin(context)
        return trainer_pb2.ListJobsResponse(jobs=[job_message(j, detail=detail) for j in jobs])

    async def GetJob(
        self, request: trainer_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.Job:
        """One job by id."""
        if not request.job_id:
            raise InvalidArgument("job_id is required")
        if len(request.job_id) > MAX_JOB_ID_CHARS:
            raise InvalidArgument(f"job_id is longer than {MAX_JOB_ID_CHARS} characters")
        job = self._trainer.store.job(request.job_id)
        if job is None:
            raise NotFound("no such job")
        return job_message(job, detail=self._is_admin(context))

    async def TriggerBatch(
        self, request: trainer_pb2.TriggerBatchRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.TriggerBatchResponse:
        """Cuts a batch of whatever waits now (admin only); empty when nothing waits."""
        caller = self._auth.authenticate(request_metadata(context))
        caller.require(Role.ADMIN)
        cut = await self._trainer.cut_by_admin(caller.token_hash[:12])
        if cut is None:
            return trainer_pb2.TriggerBatchResponse()
        return trainer_pb2.TriggerBatchResponse(dataset_id=cut.dataset_id, job_id=cut.job_id)

    def _reviewer(self, context: grpc.aio.ServicerContext) -> Principal:
        principal = self._auth.authenticate(request_metadata(context))
        principal.require(Role.EXPERT, Role.ADMIN)
        return principal

    def _canary(self) -> str | None:
        return self._trainer.registry.state().canary

    async def ListReviewItems(
        self, request: trainer_pb2.ListReviewItemsRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.ListReviewItemsResponse:
        """Unreviewed answers that need an expert (expert or admin role)."""
        caller = self._reviewer(context)
        review = self._trainer.settings.review
        if request.limit > review.max_limit:
            raise InvalidArgument(f"limit must be at most {review.max_limit}")
        canary = self._canary()
        items = self._trainer.store.review_items(
            caller=caller.token_hash,
            canary_version=canary,
            order="impact" if request.order == trainer_pb2.REVIEW_ORDER_IMPACT else "newest",
            limit=request.limit or review.default_limit,
        )
        return trainer_pb2.ListReviewItemsResponse(
            items=[review_item_message(i) for i in items], canary_version=canary or ""
        )

    async def ClaimReviewItem(
        self, request: trainer_pb2.ClaimReviewItemRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.ReviewItem:
        """Claims an item in the queue for the caller (renewing the caller's own claim), or releases
        the caller's claim (expert or admin role). An answer not in the queue is not claimed."""
        caller = self._reviewer(context)
        if not request.query_id or len(request.query_id) > _MAX_QUERY_ID_CHARS:
            raise InvalidArgument(f"query_id is required (at most {_MAX_QUERY_ID_CHARS} characters)")
        store = self._trainer.store
        canary = self._canary()
        try:
            until = store.claim(
                request.query_id,
                caller.token_hash,
                ttl_s=self._trainer.settings.review.claim_ttl_s,
                release=request.release,
                canary_version=canary,
            )
        except KeyError:
            raise NotFound(f"no answer {request.query_id} in the trainer's store") from None
        except NeedsNoReview:
            raise FailedPrecondition(_REVIEWED) from None
        if until is None:
            raise FailedPrecondition("another expert is reviewing this answer")
        if request.release:
            return trainer_pb2.ReviewItem(query_id=request.query_id)
        items = store.review_items(
            caller=caller.token_hash, canary_version=canary, query_id=request.query_id, limit=1
        )
        if not items:
            # Reviewed between the claim and this read: the claim goes too.
            store.claim(request.query_id, caller.token_hash, ttl_s=0, release=True)
            raise FailedPrecondition(_REVIEWED)
        return review_item_message(items[0])

    async def ForgetSession(
        self, request: trainer_pb2.ForgetSessionRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.ForgetSessionResponse:
        """Forgets one visitor's session everywhere the trainer keeps data (admin only)."""
        caller = self._auth.authenticate(request_metadata(context))
        caller.require(Role.ADMIN)
        session = session_to_forget(self._pseudonym_key, request.session_id, request.session_pseudonym)
        if len(request.reason) > MAX_REASON_CHARS:
            raise InvalidArgument(f"reason is longer than {MAX_REASON_CHARS} characters")
        report = await self._trainer.forget(session, reason=request.reason, caller=caller.token_hash[:12])
        return trainer_pb2.ForgetSessionResponse(
            interactions=report.interactions,
            feedback=report.feedback,
            examples=report.examples,
            datasets=[
                trainer_pb2.DatasetReplacement(old_dataset_id=old, new_dataset_id=new, removed_examples=n)
                for old, new, n in report.datasets
            ],
            marked_versions=report.marked_versions,
            audit_id=report.audit_id,
        )
