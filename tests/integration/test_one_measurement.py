"""One measurement: the gate's evaluator and the service, asked by a simulated visitor's browser,
answer a golden question with the same prompt and limits, so they give the same answer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flywheel_cli.simulation.simulate import visitor_request
from flywheel_common.registry import ModelRegistry
from flywheel_eval.dataset import load_dataset
from flywheel_evaluator.evaluation import Evaluator, load_golden
from flywheel_evaluator.settings import EvaluationSettings, GoldenSettings
from flywheel_inference.app import InferenceApp
from flywheel_inference.settings import InferenceSettings, LimitSettings
from flywheel_proto.flywheel.inference.v1 import inference_pb2_grpc

pytestmark = pytest.mark.integration

DATASET = Path(__file__).resolve().parents[2] / "datasets" / "python-faq"
QUESTIONS = 4
MAX_NEW_TOKENS = 24
# The local profile's retrieval, which differs from both services' defaults: the point is that the
# two measure alike whatever the settings, as long as they are the same.
BUDGET, WORDS = 200, 40


async def test_gate_and_service_answer_a_golden_question_alike(tmp_path: Path, onnx_model_dir: Path) -> None:
    registry = ModelRegistry(tmp_path)
    version = registry.register(onnx_model_dir, kind="base").version
    registry.set_production(version)
    golden_settings = GoldenSettings(dataset=DATASET, split="gate", limit=QUESTIONS)
    evaluation = Evaluator(
        registry,
        load_golden(golden_settings),
        EvaluationSettings(
            max_new_tokens=MAX_NEW_TOKENS,
            concurrency=1,
            max_batch=1,
            context_token_budget=BUDGET,
            passage_max_words=WORDS,
        ),
    ).evaluate(version, reuse=False)

    app = InferenceApp(
        InferenceSettings(
            grpc={"port": 0},
            metrics={"port": 0},
            kafka_enabled=False,
            artifact_root=tmp_path,
            limits=LimitSettings(context_token_budget=BUDGET, passage_max_words=WORDS),
        )
    )
    port = await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(600):
                status = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.2)
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            dataset = load_dataset(DATASET)
            items = {item.id: item for item in dataset.split("gate")}
            for result in evaluation.items:
                request = visitor_request(dataset, items[result.id], f"visitor-{result.id}", MAX_NEW_TOKENS)
                assert request.page.title and request.page.title != items[result.id].page
                response = await stub.Answer(request, timeout=120)
                assert response.model_version == version
                assert response.answer == result.prediction, result.id
    finally:
        await app.stop()
