"""TrainerService over loopback gRPC: jobs, TriggerBatch for admins, the review queue for experts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from flywheel_common.auth import Authenticator, load_tokens
from flywheel_common.grpc_server import GrpcServer
from flywheel_common.pseudonym import pseudonymise
from flywheel_common.query_ids import QueryIdSigner
from flywheel_common.registry import ModelRegistry
from flywheel_common.settings import GrpcSettings
from flywheel_proto.flywheel.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from flywheel_trainer import datasets
from flywheel_trainer.launchers import JobLauncher
from flywheel_trainer.policy import FeedbackSignal
from flywheel_trainer.service import FAILED_REASON, MAX_LIST, TrainerServicer
from flywheel_trainer.settings import TrainerSettings
from flywheel_trainer.store import FAILED, JoinStore
from flywheel_trainer.trainer import Trainer

ADMIN = (("authorization", "Bearer dev-admin-token"),)
EXPERT = (("authorization", "Bearer dev-expert-token"),)


@pytest.fixture
async def stub(
    tmp_path: Path, store: JoinStore, registry: ModelRegistry, idle_launcher: JobLauncher
) -> AsyncIterator[trainer_pb2_grpc.TrainerServiceStub]:
    settings = TrainerSettings(artifact_root=registry.root, data_dir=tmp_path / "trainer")
    trainer = Trainer(settings, store, idle_launcher, registry, None)
    server = GrpcServer(GrpcSettings(port=0), "trainer")
    servicer = TrainerServicer(trainer, Authenticator(load_tokens(None)), b"test-pseudonym-key")
    server.add_service(
        "flywheel.trainer.v1.TrainerService",
        lambda s: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, s),
    )
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield trainer_pb2_grpc.TrainerServiceStub(channel)
    await server.stop(0)


async def test_trigger_batch_needs_the_admin_role(stub: Any, store: JoinStore, ev: Any) -> None:
    store.ingest([ev.interaction(1)], [ev.correction(1)])
    with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
        await stub.TriggerBatch(trainer_pb2.TriggerBatchRequest())
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await stub.TriggerBatch(trainer_pb2.TriggerBatchRequest(), metadata=EXPERT)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert store.pending().examples == 1


async def test_trigger_batch_cuts_what_waits_then_nothing(
    stub: Any, store: JoinStore, ev: Any, tmp_path: Path
) -> None:
    store.ingest([ev.interaction(1), ev.interaction(2)], [ev.correction(1), ev.correction(2)])
    cut = await stub.TriggerBatch(trainer_pb2.TriggerBatchRequest(), metadata=ADMIN)
    assert cut.dataset_id.startswith("ds-") and cut.job_id.startswith("job-")
    empty = await stub.TriggerBatch(trainer_pb2.TriggerBatchRequest(), metadata=ADMIN)
    assert (empty.dataset_id, empty.job_id) == ("", "")
    # Each call is audited with its caller (a prefix of the token's hash) and what it started.
    audit = [json.loads(line) for line in (tmp_path / "trainer" / "audit.jsonl").read_text().splitlines()]
    assert [(a["action"], a["dataset_id"], a["job_id"]) for a in audit] == [
        ("trigger_batch", cut.dataset_id, cut.job_id),
        ("trigger_batch", None, None),
    ]
    assert all(len(a["caller"]) == 12 for a in audit)
    job = await stub.GetJob(trainer_pb2.GetJobRequest(job_id=cut.job_id))
    assert job.state == trainer_pb2.JOB_STATE_QUEUED
    assert (job.dataset_id, job.examples) == (cut.dataset_id, 2)
    assert job.created_at.seconds > 0 and not job.HasField("started_at")


async def test_list_and_get_jobs(stub: Any, store: JoinStore, ev: Any) -> None:
    ids = []
    for i in range(3):
        store.ingest([ev.interaction(i)], [ev.correction(i)])
        cut = store.cut(max_examples=10, reason="manual")
        assert cut is not None
        ids.append(cut.job_id)
    listed = await stub.ListJobs(trainer_pb2.ListJobsRequest())
    assert [j.job_id for j in listed.jobs] == ids[::-1]
    too_many = await stub.ListJobs(trainer_pb2.ListJobsRequest(limit=2**32 - 1))
    assert len(too_many.jobs) == 3
    two = await stub.ListJobs(trainer_pb2.ListJobsRequest(limit=2))
    assert len(two.jobs) == 2
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetJob(trainer_pb2.GetJobRequest(job_id="job-nope"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await stub.GetJob(trainer_pb2.GetJobRequest())
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_list_jobs_with_limit_zero_is_capped(stub: Any, store: JoinStore, ev: Any) -> None:
    for i in range(MAX_LIST + 5):
        store.ingest([ev.interaction(i)], [ev.correction(i)])
        assert store.cut(max_examples=10, reason="manual") is not None
    for limit in (0, MAX_LIST + 1):
        listed = await stub.ListJobs(trainer_pb2.ListJobsRequest(limit=limit))
        assert len(listed.jobs) == MAX_LIST


async def test_a_failed_jobs_detail_is_for_admins_only(stub: Any, store: JoinStore, ev: Any) -> None:
    store.ingest([ev.interaction(1)], [ev.correction(1)])
    cut = store.cut(max_examples=10, reason="manual")
    assert cut is not None
    detail = "OSError: [Errno 28] No space left on device: '/srv/secret-host/artifacts/x'"
    store.update_job(cut.job_id, state=FAILED, reason=detail)
    for metadata in ((), EXPERT, (("authorization", "Bearer not-a-known-token"),)):
        listed = await stub.ListJobs(trainer_pb2.ListJobsRequest(), metadata=metadata)
        got = await stub.GetJob(trainer_pb2.GetJobRequest(job_id=cut.job_id), metadata=metadata)
        assert listed.jobs[0].reason == got.reason == FAILED_REASON
    admin = await stub.GetJob(trainer_pb2.GetJobRequest(job_id=cut.job_id), metadata=ADMIN)
    assert admin.reason == detail
    with pytest.raises(grpc.aio.AioRpcError) as long_id:
        await stub.GetJob(trainer_pb2.GetJobRequest(job_id="j" * 129))
    assert long_id.value.code() == grpc.StatusCode.INVALID_ARGUMENT


USER = (("authorization", "Bearer dev-user-token"),)


async def test_the_review_queue_is_for_experts_and_admins(stub: Any, store: JoinStore, ev: Any) -> None:
    store.ingest([ev.interaction(1)], [ev.rating(1, 1)])
    for metadata, code in (
        (None, grpc.StatusCode.UNAUTHENTICATED),
        (USER, grpc.StatusCode.PERMISSION_DENIED),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListReviewItems(trainer_pb2.ListReviewItemsRequest(), metadata=metadata)
        assert refused.value.code() == code
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ClaimReviewItem(trainer_pb2.ClaimReviewItemRequest(query_id="q1"), metadata=metadata)
        assert refused.value.code() == code
    listed = await stub.ListReviewItems(trainer_pb2.ListReviewItemsRequest(), metadata=ADMIN)
    (item,) = listed.items
    assert (item.query_id, item.question, item.lowest_rating) == ("q1", "What is item 1?", 1)
    assert list(item.reasons) == [trainer_pb2.REVIEW_REASON_LOW_RATING] and not item.claimed_by_caller


async def test_a_claimed_item_is_hidden_from_other_experts(
    stub: Any, store: JoinStore, registry: ModelRegistry, ev: Any
) -> None:
    store.ingest([ev.interaction(1)], [ev.thumbs(1, False)])
    claimed = await stub.ClaimReviewItem(trainer_pb2.ClaimReviewItemRequest(query_id="q1"), metadata=EXPERT)
    assert claimed.claimed_by_caller and claimed.claimed_until.seconds > 0
    assert list(claimed.reasons) == [trainer_pb2.REVIEW_REASON_THUMBS_DOWN]
    # The admin is another reviewer: the expert's claim keeps the item from them.
    assert not (await stub.ListReviewItems(trainer_pb2.ListReviewItemsRequest(), metadata=ADMIN)).items
    with pytest.raises(grpc.aio.AioRpcError) as taken:
        await stub.ClaimReviewItem(trainer_pb2.ClaimReviewItemRequest(query_id="q1"), metadata=ADMIN)
    assert taken.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await stub.ClaimReviewItem(
        trainer_pb2.ClaimReviewItemRequest(query_id="q1", release=True), metadata=EXPERT
    )
    assert len((await stub.ListReviewItems(trainer_pb2.ListReviewItemsRequest(), metadata=ADMIN)).items) == 1
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.ClaimReviewItem(trainer_pb2.ClaimReviewItemRequest(query_id="q9"), metadata=EXPERT)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_refused_claim_leaves_no_claim_behind(stub: Any, store: JoinStore, ev: Any) -> None:
    store.ingest([ev.interaction(1)], [ev.rating(1, 5)])  # rated well: not in the queue
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ClaimReviewItem(trainer_pb2.ClaimReviewItemRequest(query_id="q1"), metadata=EXPERT)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "needs no review" in (refused.value.details() or "")
    # A visitor then rates it low: another reviewer sees it and claims it at once.
    store.ingest([], [ev.thumbs(1, False)])
    listed = await stub.ListReviewItems(trainer_pb2.ListReviewItemsRequest(), metadata=ADMIN)
    assert [i.query_id for i in listed.items] == ["q1"]
    claimed = await stub.ClaimReviewItem(trainer_pb2.ClaimReviewItemRequest(query_id="q1"), metadata=ADMIN)
    assert claimed.claimed_by_caller


async def test_answers_of_the_canary_version_are_marked(
    stub: Any, store: JoinStore, registry: ModelRegistry, ev: Any
) -> None:
    store.ingest([ev.interaction(1)], [])
    registry.set_canary("v1", 0.5)
    listed = await stub.ListReviewItems(
        trainer_pb2.ListReviewItemsRequest(order=trainer_pb2.REVIEW_ORDER_IMPACT), metadata=EXPERT
    )
    assert listed.canary_version == "v1"
    assert [list(i.reasons) for i in listed.items] == [[trainer_pb2.REVIEW_REASON_CANARY]]


def _visitor(name: str) -> str:
    return pseudonymise(b"test-pseudonym-key", name, domain="session")


def _files(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


async def test_forget_session_removes_it_everywhere_and_a_replay_cannot_bring_it_back(
    stub: Any, store: JoinStore, registry: ModelRegistry, tmp_path: Path, ev: Any
) -> None:
    gone, kept = _visitor("visitor-1"), _visitor("visitor-2")
    signer = QueryIdSigner(b"q" * 16)
    # An answer whose id names the session (a q2 id), corrected by an expert (the expert's pseudonym).
    named = ev.interaction(3, session=gone)
    named.query_id = signer.issue("v1", gone)
    correction = ev.correction(3)
    correction = FeedbackSignal(
        correction.feedback_id, named.query_id, correction.kind, 0, "Fixed.", 2, "expert"
    )
    store.ingest(
        [ev.interaction(1, session=gone), ev.interaction(2, session=kept), named],
        [ev.correction(1), ev.correction(2), correction, ev.rating(1, 1, session=gone)],
    )
    cut = await stub.TriggerBatch(trainer_pb2.TriggerBatchRequest(), metadata=ADMIN)
    old = cut.dataset_id
    model = tmp_path / "candidate"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"x")
    trained = registry.register(model, kind="candidate", metadata={"lineage": {"datasets": [old]}}).version

    request = trainer_pb2.ForgetSessionRequest(session_id="visitor-1", reason="ticket 42")
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await stub.ForgetSession(request, metadata=EXPERT)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    done = await stub.ForgetSession(request, metadata=ADMIN)
    assert (done.interactions, done.feedback, done.examples) == (2, 3, 3)
    [replaced] = done.datasets
    assert (replaced.old_dataset_id, replaced.removed_examples) == (old, 3)
    assert list(done.marked_versions) == [trained]

    # The store, the datasets and the audit keep nothing of the session: not its pseudonym, not its ids.
    root = registry.root / "datasets"
    assert not (root / old).exists()
    new = datasets.load(registry.root, replaced.new_dataset_id)
    assert [e["query_id"] for e in new.examples] == ["q2"] and new.manifest["replaces"] == [old]
    assert store.job(cut.job_id).dataset_id == new.dataset_id  # type: ignore[union-attr]
    assert registry.marks(trained)[0]["replaced_by"] == [new.dataset_id]
    for data in (_files(store.path.parent), _files(root)):
        assert gone.encode() not in data and named.query_id.encode() not in data and b'"q1"' not in data
    assert kept.encode() in _files(store.path.parent)
    audit = (tmp_path / "trainer" / "audit.jsonl").read_text()
    assert done.audit_id in audit and "ticket 42" in audit and gone not in audit

    # A replay of its events (Kafka keeps them for their retention) is dropped at the tombstone.
    replay = store.ingest(
        [ev.interaction(1, session=gone), named], [ev.rating(1, 5, session=gone), correction]
    )
    assert replay.ignored["interaction of a forgotten session"] == 2
    assert replay.ignored["feedback of a forgotten session"] == 2
    assert store.counts()["interactions"] == 1
    # Forgetting again finds nothing more; its pseudonym works as well as its id.
    again = await stub.ForgetSession(trainer_pb2.ForgetSessionRequest(session_pseudonym=gone), metadata=ADMIN)
    assert (again.interactions, again.feedback, again.examples, len(again.datasets)) == (0, 0, 0, 0)


@pytest.mark.parametrize(
    "request_",
    [
        trainer_pb2.ForgetSessionRequest(),
        trainer_pb2.ForgetSessionRequest(session_id="a", session_pseudonym="0" * 32),
        trainer_pb2.ForgetSessionRequest(session_pseudonym="not-a-pseudonym"),
        trainer_pb2.ForgetSessionRequest(session_id="a\x1b[2J"),
        trainer_pb2.ForgetSessionRequest(session_id="a", reason="x" * 1001),
    ],
)
async def test_forget_session_refuses_a_bad_request(stub: Any, request_: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ForgetSession(request_, metadata=ADMIN)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
