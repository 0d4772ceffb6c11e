"""The trainer on the real broker and the real model: corrections -> one batch -> a local training job
-> a registered candidate with lineage; killed mid-batch, nothing lost or doubled; replays train nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from flywheel_common.dev_secrets import DEV_EVENT_SIGNING_KEY, DEV_QUERY_ID_KEY
from flywheel_common.event_signing import SIGNATURE_HEADER, EventSigner
from flywheel_common.kafka import EventProducer, decode, event_headers
from flywheel_common.registry import ModelRegistry
from flywheel_common.settings import GrpcSettings, KafkaSettings, MetricsSettings
from flywheel_model.prepare import read_manifest
from flywheel_proto.flywheel.events.v1 import events_pb2
from flywheel_proto.flywheel.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from flywheel_trainer import datasets
from flywheel_trainer.app import STORE_FILE, TrainerApp
from flywheel_trainer.settings import BatchSettings, ConsumerSettings, TrainerSettings

pytestmark = pytest.mark.integration

ADMIN = (("authorization", "Bearer dev-admin-token"),)
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "brown"]
# Short prompts and few optimizer steps: the test is about the plumbing, not the quality.
JOB_ENV = {
    "FLYWHEEL_TRAINER_JOB_HYPER__EPOCHS": "2",
    "FLYWHEEL_TRAINER_JOB_HYPER__GRADIENT_ACCUMULATION": "10",
    "FLYWHEEL_TRAINER_JOB_HYPER__LEARNING_RATE": "0.001",
    "FLYWHEEL_TRAINER_JOB_VERIFY__PROMPTS": "2",
    "FLYWHEEL_TRAINER_JOB_VERIFY__MAX_NEW_TOKENS": "12",
}


def interaction(i: int) -> events_pb2.Interaction:
    return events_pb2.Interaction(
        query_id=f"q-{i:04d}",
        page_title="Lamps",
        question=f"What colour is lamp {i}?",
        answer="The page does not say.",
        passages=[f"Lamp {i} is {COLOURS[i % len(COLOURS)]}.", f"Lamp {i} was made in {1950 + i}."],
        model_version="v1",
    )


def correction(i: int) -> events_pb2.Feedback:
    return events_pb2.Feedback(
        feedback_id=f"fb-{i:04d}",
        query_id=f"q-{i:04d}",
        kind=events_pb2.FEEDBACK_KIND_CORRECTION,
        redacted_text=f"Lamp {i} is {COLOURS[i % len(COLOURS)]}.",
        reviewer_role=events_pb2.REVIEWER_ROLE_EXPERT,
        model_version="v1",
    )


def signed(topic: str, event: Message) -> list[tuple[str, bytes]]:
    """The headers inference gives an interaction, or the feedback service a feedback event: its
    type, trace and signature."""
    interaction = isinstance(event, events_pb2.Interaction)
    signer = (
        EventSigner.for_interactions(DEV_QUERY_ID_KEY) if interaction else EventSigner(DEV_EVENT_SIGNING_KEY)
    )
    signature = signer.sign(topic, event.query_id.encode(), event.SerializeToString())
    return [*event_headers(event), (SIGNATURE_HEADER, signature)]


def produce_all(settings: KafkaSettings, events: list[tuple[str, Message]]) -> None:
    """Produces (topic, event) pairs keyed by query id and waits for every ack."""
    producer = EventProducer(settings, linger_ms=5, max_block_ms=5000)
    producer.connect()
    try:
        futures = [producer.send(topic, e.query_id, e, signed(topic, e)) for topic, e in events]
        for f in futures:
            f.get(timeout=20)
    finally:
        producer.close()


def events_for(
    settings: KafkaSettings, ids: range, *, feedback_first: bool = False
) -> list[tuple[str, Message]]:
    """Each interaction with its correction; with feedback_first, every other correction comes first."""
    topics = settings.topics
    out: list[tuple[str, Message]] = []
    for i in ids:
        pair: list[tuple[str, Message]] = [
            (topics.interactions, interaction(i)),
            (topics.feedback, correction(i)),
        ]
        out += pair[::-1] if feedback_first and i % 2 else pair
    return out


@pytest.fixture
def artifact_root(tmp_path: Path, prepared_model: Path) -> Path:
    """A registry holding the prepared base model as v1, in production."""
    root = tmp_path / "artifacts"
    registry = ModelRegistry(root)
    v1 = registry.register(
        prepared_model / "onnx",
        kind="base",
        hf_dir=prepared_model / "hf",
        metadata={"prepared": read_manifest(prepared_model)},
    )
    registry.set_production(v1.version)
    return root


Starter = Callable[..., Awaitable[tuple[TrainerApp, trainer_pb2_grpc.TrainerServiceStub]]]


@pytest.fixture
async def start_trainer(kafka_settings: KafkaSettings, tmp_path: Path) -> AsyncIterator[Starter]:
    """Starts trainers in-process (stopped after the test); returns each with a stub."""
    running: list[tuple[TrainerApp, grpc.aio.Channel]] = []

    async def start(artifact_root: Path, **overrides: Any) -> tuple[TrainerApp, Any]:
        settings = TrainerSettings(
            grpc=GrpcSettings(port=0, grace_s=1),
            metrics=MetricsSettings(port=0),
            kafka=kafka_settings,
            artifact_root=artifact_root,
            data_dir=tmp_path / "trainer",
            **overrides,
        )
        app = TrainerApp(settings)
        port = await app.start()
        await asyncio.wait_for(app.ready.wait(), 60)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        running.append((app, channel))
        return app, trainer_pb2_grpc.TrainerServiceStub(channel)

    yield start
    for app, channel in running:
        await channel.close()
        await app.stop(0)


async def wait_for(predicate: Callable[[], Any], limit_s: float, what: str) -> Any:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def poll_until(predicate: Callable[[], Any], limit_s: float, what: str, every_s: float = 0.05) -> Any:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(900)
async def test_corrections_become_a_candidate_and_replays_train_nothing(
    kafka_settings: KafkaSettings,
    artifact_root: Path,
    start_trainer: Starter,
    read_topic: Callable[..., list[Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in JOB_ENV.items():
        monkeypatch.setenv(key, value)
    n = 20
    # Half the corrections arrive before their interaction: they wait in the join store.
    produce_all(kafka_settings, events_for(kafka_settings, range(n), feedback_first=True))
    app, stub = await start_trainer(
        artifact_root,
        batch=BatchSettings(max_examples=n, min_examples=n, max_wait_s=3600, check_interval_s=0.5),
    )

    # One batch of all 20, one job, one candidate.
    job = await wait_for(
        lambda: next(iter(app.store.jobs(states=["succeeded", "failed"])), None), 600, "the training job"
    )
    log_file = app.settings.data_dir / "jobs" / f"{job.job_id}.log"
    assert job.state == "succeeded", f"{job.reason}\n{log_file.read_text()[-3000:]}"
    assert job.examples == n and job.base_version == "v1" and job.launcher == "local"
    dataset = datasets.load(artifact_root, job.dataset_id)
    assert dataset.manifest["counts"] == {"correction": n, "positive": 0, "negative": 0}
    assert sorted(dataset.manifest["example_ids"]) == sorted(f"c-fb-{i:04d}" for i in range(n))

    registry = ModelRegistry(artifact_root)
    candidate = registry.get(job.candidate_version)
    registry.verify(candidate.version)
    assert candidate.kind == "candidate" and candidate.version == "v2"
    lineage, training = candidate.manifest["lineage"], candidate.manifest["training"]
    assert lineage["parent_version"] == "v1"
    assert (lineage["dataset_id"], lineage["dataset_sha256"]) == (dataset.dataset_id, dataset.sha256)
    assert lineage["datasets"] == [dataset.dataset_id]
    assert len(lineage["adapter_sha256"]) == 64 and lineage["job_id"] == job.job_id
    assert lineage["duration_s"] > 0 and lineage["examples"]["trained"] == n
    assert training["hyperparameters"]["lora_r"] == 16 and training["hyperparameters"]["epochs"] == 2
    assert training["device"] == "cpu" and training["quantization"] == "none"
    assert training["steps"] == 4 and len(training["loss_curve"]) == 4
    first, last = training["epoch_losses"]
    assert last < first, training["epoch_losses"]
    assert candidate.manifest["verify"]["prompts"] == 2
    assert (candidate.hf_dir / "config.json").is_file()

    # Announced once, with its lineage.
    records = await wait_for(lambda: read_topic(kafka_settings.topics.candidates, 1, 5), 60, "ModelCandidate")
    (event,) = [decode(r, events_pb2.ModelCandidate) for r in records]
    assert (event.version, event.parent_version, event.dataset_id, event.job_id) == (
        "v2", "v1", dataset.dataset_id, job.job_id,
    )  # fmt: skip

    # The candidate's ONNX model serves through the inference path.
    from flywheel_model.engine import AnswerEngine, EngineSettings
    from flywheel_model.generation import SamplingParams
    from flywheel_model.runtime import OrtSettings

    engine = AnswerEngine(candidate.model_dir, OrtSettings(provider="cpu"), EngineSettings())
    try:
        answer = engine.answer("Lamp 3 is purple.", "Lamps", "What colour is lamp 3?", SamplingParams(16))
        assert answer.completion_tokens > 0
    finally:
        engine.close()

    # The same events again (a producer's retry, or a replay): nothing new, no second job.
    handled = app.consumer.records_handled
    produce_all(kafka_settings, events_for(kafka_settings, range(n)))
    await wait_for(lambda: app.consumer.records_handled >= handled + 2 * n, 60, "the replayed events")
    assert app.store.counts()["examples"] == n
    empty = await stub.TriggerBatch(trainer_pb2.TriggerBatchRequest(), metadata=ADMIN)
    assert empty.job_id == ""
    await app.stop(0)

    # A consumer group reading the whole log again (offsets reset) trains nothing either.
    again, again_stub = await start_trainer(
        artifact_root, consumer=ConsumerSettings(group_id="flywheel-trainer-replay")
    )
    await wait_for(lambda: again.consumer.records_handled >= 4 * n, 60, "the whole log")
    assert (await again_stub.TriggerBatch(trainer_pb2.TriggerBatchRequest(), metadata=ADMIN)).job_id == ""
    jobs = await again_stub.ListJobs(trainer_pb2.ListJobsRequest())
    assert [j.job_id for j in jobs.jobs] == [job.job_id]
    assert jobs.jobs[0].state == trainer_pb2.JOB_STATE_SUCCEEDED
    announced = await wait_for(lambda: read_topic(kafka_settings.topics.candidates, 2, 5), 60, "the topic")
    assert len(announced) == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def trainer_env(kafka: KafkaSettings, data_dir: Path, artifact_root: Path, port: int) -> dict[str, str]:
    env = {
        **os.environ,
        "FLYWHEEL_TRAINER_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "FLYWHEEL_TRAINER_GRPC__PORT": str(port),
        "FLYWHEEL_TRAINER_METRICS__PORT": "0",
        "FLYWHEEL_TRAINER_DATA_DIR": str(data_dir),
        "FLYWHEEL_TRAINER_ARTIFACT_ROOT": str(artifact_root),
        # One record per poll: the trainer is killed somewhere in the middle of the backlog.
        "FLYWHEEL_TRAINER_CONSUMER__MAX_RECORDS": "1",
        "FLYWHEEL_TRAINER_BATCH__MAX_EXAMPLES": "100000",
        # No training here: the job "fails" at once; this test is about the examples.
        "FLYWHEEL_TRAINER_JOBS__LOCAL_COMMAND": json.dumps([sys.executable, "-c", "raise SystemExit(3)"]),
    }
    for field, topic in kafka.topics.model_dump().items():
        env[f"FLYWHEEL_TRAINER_KAFKA__TOPICS__{field.upper()}"] = topic
    return env


def stored_examples(data_dir: Path) -> int:
    path = data_dir / STORE_FILE
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM examples").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


@pytest.mark.timeout(300)
def test_killed_mid_batch_nothing_is_lost_or_doubled(kafka_settings: KafkaSettings, tmp_path: Path) -> None:
    n = 300
    produce_all(kafka_settings, events_for(kafka_settings, range(n)))
    data_dir, artifact_root, port = tmp_path / "trainer", tmp_path / "artifacts", free_port()
    env = trainer_env(kafka_settings, data_dir, artifact_root, port)
    cmd = [sys.executable, "-m", "flywheel_trainer"]
    log_path = tmp_path / "trainer.log"
    with log_path.open("ab") as log:
        first = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            poll_until(lambda: stored_examples(data_dir) >= 10, 120, "the first examples")
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
        killed_at = stored_examples(data_dir)
        assert 0 < killed_at < n, f"killed after {killed_at} of {n} examples: not in the middle"

        second = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            poll_until(lambda: stored_examples(data_dir) >= n, 120, "every example", every_s=0.5)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = trainer_pb2_grpc.TrainerServiceStub(channel)
                cut = stub.TriggerBatch(trainer_pb2.TriggerBatchRequest(), metadata=ADMIN, timeout=30)
            ids = datasets.load(artifact_root, cut.dataset_id).manifest["example_ids"]
            assert len(ids) == len(set(ids)) == n
            assert set(ids) == {f"c-fb-{i:04d}" for i in range(n)}
            assert stored_examples(data_dir) == n
        finally:
            second.send_signal(signal.SIGTERM)
            try:
                second.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(second.pid, signal.SIGKILL)
    assert second.returncode == 0, log_path.read_text()[-3000:]
