"""The privacy loop end to end: a question with an e-mail, a phone number and a name goes inference ->
Kafka -> the trainer's store -> a dataset (and the visitor's vote to the evaluator's live signals),
and its raw values are nowhere on disk; then `flywheel privacy forget` removes the session, and
nothing of it (pseudonym, query id) stays in the stores or the datasets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from flywheel_cli.__main__ import main as cli
from flywheel_cli.local.kafka_broker import LocalBroker
from flywheel_common.dev_secrets import DEV_PSEUDONYM_KEY
from flywheel_common.pseudonym import pseudonymise
from flywheel_common.registry import ModelRegistry
from flywheel_common.settings import GrpcSettings, KafkaSettings, MetricsSettings
from flywheel_evaluator.app import EvaluatorApp
from flywheel_evaluator.evaluation import GoldenItem, GoldenSet
from flywheel_evaluator.settings import EvaluatorSettings
from flywheel_feedback.app import FeedbackApp
from flywheel_feedback.settings import FeedbackSettings
from flywheel_inference.app import InferenceApp
from flywheel_inference.settings import InferenceSettings
from flywheel_proto.flywheel.feedback.v1 import feedback_pb2, feedback_pb2_grpc
from flywheel_proto.flywheel.inference.v1 import inference_pb2, inference_pb2_grpc
from flywheel_proto.flywheel.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from flywheel_trainer.app import TrainerApp
from flywheel_trainer.launchers import JobLauncher, JobSpec, Outcome
from flywheel_trainer.settings import TrainerSettings

pytestmark = pytest.mark.integration

USER = (("authorization", "Bearer dev-user-token"),)
EXPERT = (("authorization", "Bearer dev-expert-token"),)
ADMIN = (("authorization", "Bearer dev-admin-token"),)
SESSION = "privacy-e2e-visitor-5b1f"
EMAIL, PHONE, NAME = "wilhelmina.quartermaine@example.com", "+1 415-555-0187", "Wilhelmina Quartermaine"
RAW = (EMAIL, "415-555-0187", "Quartermaine", SESSION)


class IdleLauncher(JobLauncher):
    """Jobs never start: this test is about the data, not training."""

    name = "idle"

    def launch(self, spec: JobSpec) -> str:
        return spec.job_id

    def wait(self, handle: str) -> Outcome:
        time.sleep(3600)
        return Outcome(False, "never")

    def stop(self, handle: str) -> None:
        pass


def on_disk(root: Path, needle: str) -> list[str]:
    """Files under `root` whose bytes contain `needle` (Kafka segments, SQLite files and WALs, JSON)."""
    data = needle.encode()
    return [str(p) for p in root.rglob("*") if p.is_file() and data in p.read_bytes()]


async def until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while (value := check()) is None or value is False or value == 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.3)
    return value


Services = tuple[Any, Any, Any, TrainerApp, EvaluatorApp]


@pytest.fixture
async def services(
    tmp_path: Path, kafka_settings: KafkaSettings, onnx_model_dir: Path
) -> AsyncIterator[Services]:
    registry = ModelRegistry(tmp_path / "artifacts")
    registry.set_production(registry.register(onnx_model_dir, kind="base").version)
    inference = InferenceApp(
        InferenceSettings(
            grpc={"port": 0}, metrics={"port": 0}, artifact_root=registry.root, kafka=kafka_settings
        )
    )
    feedback = FeedbackApp(
        FeedbackSettings(
            grpc=GrpcSettings(port=0, grace_s=1), metrics=MetricsSettings(port=0), kafka=kafka_settings
        )
    )
    trainer = TrainerApp(
        TrainerSettings(
            grpc=GrpcSettings(port=0, grace_s=1),
            metrics=MetricsSettings(port=0),
            kafka=kafka_settings,
            artifact_root=registry.root,
            data_dir=tmp_path / "trainer",
            # Cut by hand (TriggerBatch), so the test knows when the dataset is written.
            batch={"min_examples": 1000, "max_examples": 1000, "max_wait_s": 86400},
        ),
        launcher=IdleLauncher(),
    )
    # No candidate is evaluated here: a golden set of one stub question, and production not scored.
    evaluator = EvaluatorApp(
        EvaluatorSettings(
            grpc=GrpcSettings(port=0, grace_s=1),
            metrics=MetricsSettings(port=0),
            kafka=kafka_settings,
            artifact_root=registry.root,
            state_dir=tmp_path / "evaluator",
            evaluation={"prefetch_production": False},
        ),
        golden=GoldenSet("stub@0:gate", "gate", (GoldenItem("q0", "?", ("a",), "a", ""),)),
    )
    channels: list[grpc.aio.Channel] = []
    try:
        # One after another, each ready before the next starts: their start-up work shares the
        # default thread pool, where a slow broker connection would hold up the model's loading.
        ports = [await inference.start()]
        await until(lambda: inference.router.ready, 300, "inference to load the model")
        ports.append(await feedback.start())
        await asyncio.wait_for(feedback.ready.wait(), 300)
        ports.append(await trainer.start())
        await asyncio.wait_for(trainer.ready.wait(), 300)
        ports.append(await evaluator.start())
        await asyncio.wait_for(evaluator.ready.wait(), 300)
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for port in ports]
        stubs = (
            inference_pb2_grpc.InferenceServiceStub(channels[0]),
            feedback_pb2_grpc.FeedbackServiceStub(channels[1]),
            trainer_pb2_grpc.TrainerServiceStub(channels[2]),
        )
        yield (*stubs, trainer, evaluator)
    finally:
        # Stopped whatever happened: a service left running keeps the test process alive.
        for channel in channels:
            await channel.close()
        await inference.stop(grace=1)
        await feedback.stop(grace=1)
        await trainer.stop(0)
        await evaluator.stop(0)


@pytest.mark.timeout(900)
async def test_raw_values_are_nowhere_on_disk_and_a_forgotten_session_is_gone(
    services: Services, kafka_broker: LocalBroker, tmp_path: Path
) -> None:
    inference, feedback, trainer_stub, trainer, evaluator = services
    question = f"My name is {NAME}, email {EMAIL}, phone {PHONE}: who created Python?"
    request = inference_pb2.AnswerRequest(
        page=inference_pb2.Page(
            url="https://example.org/faq", title="Python FAQ", text="Python was created by Guido van Rossum."
        ),
        question=question,
        session_id=SESSION,
        options=inference_pb2.GenerationOptions(max_new_tokens=8),
    )
    answer = await inference.Answer(request, timeout=120)
    # The visitor rates it down and comments; an expert corrects it: a training example and a negative.
    for n, signal in enumerate(({"thumbs_up": False}, {"comment": f"My name is {NAME}, write to {EMAIL}"})):
        await feedback.SubmitFeedback(
            feedback_pb2.SubmitFeedbackRequest(
                query_id=answer.query_id, session_id=SESSION, idempotency_key=f"k-{n}", **signal
            ),
            metadata=USER,
            timeout=30,
        )
    correction = feedback_pb2.SubmitCorrectionRequest(
        query_id=answer.query_id, corrected_answer="Guido van Rossum created Python."
    )
    await feedback.SubmitCorrection(correction, metadata=EXPERT, timeout=30)
    await until(lambda: trainer.store.pending().examples, 60, "the trainer to join the correction")
    await until(lambda: trainer.store.counts().get("examples.negative", 0), 60, "the negative example")
    await until(lambda: evaluator.store.stats(answer.model_version, 0).sessions, 60, "the evaluator's vote")
    cut = await trainer_stub.TriggerBatch(trainer_pb2.TriggerBatchRequest(), metadata=ADMIN, timeout=30)
    datasets = tmp_path / "artifacts" / "datasets"
    assert (datasets / cut.dataset_id / "examples.jsonl").is_file()

    # Nowhere on disk: the broker's log segments (every topic), the trainer's SQLite files and audit,
    # the datasets. The same searches find what the data does hold, so they do look inside it.
    pseudonym = pseudonymise(DEV_PSEUDONYM_KEY, SESSION, domain="session")
    places = {
        "kafka": kafka_broker.home / "data",
        "trainer": tmp_path / "trainer",
        "datasets": datasets,
        "evaluator": tmp_path / "evaluator",
    }
    for name, root in places.items():
        for value in RAW:
            assert not on_disk(root, value), f"{value!r} is on disk in {name}: {on_disk(root, value)}"
        assert on_disk(root, answer.query_id), f"the search does not see into {name}"
    assert on_disk(places["kafka"], "[EMAIL]") and on_disk(places["trainer"], "[NAME]")
    assert on_disk(places["trainer"], pseudonym) and on_disk(places["evaluator"], pseudonym)

    # Forget the session (the CLI, as a privacy officer would): the store and the datasets lose it.
    target = f"--target=127.0.0.1:{trainer.server.port}"
    code = await asyncio.to_thread(
        cli,
        [
            "privacy",
            target,
            f"--evaluator=127.0.0.1:{evaluator.server.port}",
            "forget",
            "--session",
            SESSION,
            "--reason",
            "e2e test",
            "--token",
            "dev-admin-token",
        ],
    )
    assert code == 0
    for name in ("trainer", "datasets", "evaluator"):
        for value in (pseudonym, answer.query_id):
            assert not on_disk(places[name], value), f"{value!r} is still on disk in {name}"
    counts = trainer.store.counts()
    assert (counts["interactions"], counts["feedback"], counts["examples"]) == (0, 0, 0)
    live = evaluator.store.stats(answer.model_version, 0)
    assert (live.sessions, live.sessions_served, live.interactions) == (0, 0, 1)
    assert not (datasets / cut.dataset_id).exists()
    [replacement] = [p for p in datasets.iterdir() if not p.name.startswith(".")]
    assert (replacement / "examples.jsonl").read_text() == ""
