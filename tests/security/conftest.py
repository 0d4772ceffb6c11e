"""The security tier's servers: the four gRPC services on loopback, each with a healthy request.

Inference serves the real prepared model (no broker: its interactions are not the subject here).
Feedback runs its servicer with a producer that records events (the Kafka path has its own tests in
tests/integration). Trainer and evaluator run their servicers over real stores and registries.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest

from flywheel_common.auth import Authenticator, load_tokens
from flywheel_common.dev_secrets import DEV_PSEUDONYM_KEY
from flywheel_common.grpc_server import GrpcServer
from flywheel_common.query_ids import QueryIdSigner
from flywheel_common.redaction import Redactor
from flywheel_common.registry import ModelRegistry
from flywheel_common.settings import GrpcSettings
from flywheel_evaluator.app import EvaluatorApp
from flywheel_evaluator.evaluation import GoldenItem, GoldenSet
from flywheel_evaluator.service import EvaluatorServicer
from flywheel_evaluator.settings import EvaluatorSettings
from flywheel_feedback.service import FeedbackServicer
from flywheel_feedback.settings import FeedbackSettings
from flywheel_inference.app import InferenceApp
from flywheel_inference.settings import InferenceSettings
from flywheel_proto.flywheel.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from flywheel_proto.flywheel.feedback.v1 import feedback_pb2, feedback_pb2_grpc
from flywheel_proto.flywheel.inference.v1 import inference_pb2, inference_pb2_grpc
from flywheel_proto.flywheel.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from flywheel_trainer.launchers import JobLauncher
from flywheel_trainer.policy import ExamplePolicy
from flywheel_trainer.service import TrainerServicer
from flywheel_trainer.settings import PolicySettings, TrainerSettings
from flywheel_trainer.store import JoinStore
from flywheel_trainer.trainer import Trainer

# The shared definitions live beside the tests; --import-mode=importlib does not put this folder on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flywheel_security import INFERENCE_LIMITS, QUERY_ID_KEY, USER, Service


class RecordingProducer:
    """Stands in for Kafka: every event the feedback service would produce."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    async def produce(self, topic: str, key: str, message: Any, headers: Any = None) -> None:
        self.events.append(message)


async def _serve(server: GrpcServer) -> grpc.aio.Channel:
    port = await server.start()
    await server.set_serving(True)
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}")


@pytest.fixture(scope="session")
def signer() -> QueryIdSigner:
    return QueryIdSigner(QUERY_ID_KEY)


@pytest.fixture(scope="session")
async def inference(tmp_path_factory: pytest.TempPathFactory, onnx_model_dir: Path) -> AsyncIterator[Service]:
    settings = InferenceSettings(
        grpc={"port": 0},
        metrics={"port": 0},
        model_dir=onnx_model_dir,
        kafka_enabled=False,
        limits=INFERENCE_LIMITS,
        artifact_root=tmp_path_factory.mktemp("inference-artifacts"),
    )
    app = InferenceApp(settings)
    port = await app.start()
    for _ in range(1200):
        if app.router.ready:
            break
        await asyncio.sleep(0.1)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    request = inference_pb2.AnswerRequest(
        page=inference_pb2.Page(url="https://example.org/", title="Lamps", text="Lamp 3 is purple."),
        question="What colour is lamp 3?",
        options=inference_pb2.GenerationOptions(max_new_tokens=2),
    )
    yield Service("inference", channel, stub, lambda: stub.Answer(request, timeout=120))
    await channel.close()
    await app.stop(grace=5)


@pytest.fixture(scope="session")
async def feedback(signer: QueryIdSigner) -> AsyncIterator[Service]:
    settings = FeedbackSettings(rate_limit={"per_second": 0})
    servicer = FeedbackServicer(
        settings,
        producer=RecordingProducer(),  # type: ignore[arg-type]
        authenticator=Authenticator(load_tokens(None)),
        redactor=Redactor(),
        signer=signer,
        pseudonym_key=b"security-tier-pseudonym-key",
    )
    server = GrpcServer(GrpcSettings(port=0), "feedback")
    server.add_service(
        "flywheel.feedback.v1.FeedbackService",
        lambda s: feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(servicer, s),
    )
    channel = await _serve(server)
    stub = feedback_pb2_grpc.FeedbackServiceStub(channel)

    def healthy() -> Awaitable[Any]:
        request = feedback_pb2.SubmitFeedbackRequest(query_id=signer.issue("v1"), rating=5)
        return stub.SubmitFeedback(request, metadata=USER, timeout=30)

    yield Service("feedback", channel, stub, healthy)
    await channel.close()
    await server.stop(0)


def _fake_model(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.onnx").write_bytes(b"not really onnx")
    return path


@pytest.fixture(scope="session")
async def trainer(
    tmp_path_factory: pytest.TempPathFactory, idle_launcher: JobLauncher
) -> AsyncIterator[Service]:
    root = tmp_path_factory.mktemp("trainer")
    registry = ModelRegistry(root / "artifacts")
    registry.set_production(registry.register(_fake_model(root / "base"), kind="base").version)
    store = JoinStore(root / "trainer.sqlite3", ExamplePolicy(PolicySettings()))
    settings = TrainerSettings(artifact_root=registry.root, data_dir=root / "data")
    servicer = TrainerServicer(
        Trainer(settings, store, idle_launcher, registry, None),
        Authenticator(load_tokens(None)),
        b"test-pseudonym-key",
    )
    server = GrpcServer(GrpcSettings(port=0), "trainer")
    server.add_service(
        "flywheel.trainer.v1.TrainerService",
        lambda s: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, s),
    )
    channel = await _serve(server)
    stub = trainer_pb2_grpc.TrainerServiceStub(channel)
    yield Service("trainer", channel, stub, lambda: stub.ListJobs(trainer_pb2.ListJobsRequest(), timeout=30))
    await channel.close()
    await server.stop(0)
    store.close()


@pytest.fixture(scope="session")
async def evaluator(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Service]:
    root = tmp_path_factory.mktemp("evaluator")
    golden = GoldenSet(
        "stub@0:gate", "gate", tuple(GoldenItem(f"q{i}", "?", ("a",), "a", "") for i in range(4))
    )
    app = EvaluatorApp(
        EvaluatorSettings(artifact_root=root / "artifacts", state_dir=root / "state"), golden=golden
    )
    for _ in range(2):
        app.registry.register(_fake_model(root / "model"), kind="test")
    app.registry.set_production("v1")
    app.gatekeeper.decisions._emit = None  # no broker in this tier
    servicer = EvaluatorServicer(app.gatekeeper, Authenticator(load_tokens(None)), DEV_PSEUDONYM_KEY)
    server = GrpcServer(GrpcSettings(port=0), "evaluator")
    server.add_service(
        "flywheel.evaluator.v1.EvaluatorService",
        lambda s: evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server(servicer, s),
    )
    channel = await _serve(server)
    stub = evaluator_pb2_grpc.EvaluatorServiceStub(channel)
    yield Service(
        "evaluator", channel, stub, lambda: stub.GetRollout(evaluator_pb2.GetRolloutRequest(), timeout=30)
    )
    await channel.close()
    await server.stop(0)
