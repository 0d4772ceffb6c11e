"""The inference service on loopback with the real ONNX model: answers, streaming, health,
reflection, bad input, back-pressure, deadlines and hot-swap under load."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from flywheel_common.dev_secrets import DEV_QUERY_ID_KEY
from flywheel_common.query_ids import QueryIdSigner
from flywheel_common.registry import ModelRegistry
from flywheel_inference.app import InferenceApp
from flywheel_inference.settings import InferenceSettings, LimitSettings
from flywheel_proto.flywheel.inference.v1 import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.integration

PAGE = inference_pb2.Page(
    url="https://example.org/kafka",
    title="About Kafka",
    html=(
        "<html><body><h1>Apache Kafka</h1><p>Apache Kafka is a distributed event store and stream-processing"
        " platform. It was originally developed at LinkedIn and was open-sourced in early 2011.</p>"
        "<p>Kafka stores records in topics, which are split into partitions.</p></body></html>"
    ),
)


def request(
    question: str = "Where was Kafka originally developed?", **options: Any
) -> inference_pb2.AnswerRequest:
    return inference_pb2.AnswerRequest(
        page=PAGE,
        question=question,
        session_id="visitor-1",
        options=inference_pb2.GenerationOptions(max_new_tokens=options.pop("max_new_tokens", 16), **options),
    )


@pytest.fixture(scope="module")
def registry_root(tmp_path_factory: pytest.TempPathFactory, onnx_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("artifacts")
    registry = ModelRegistry(root)
    version = registry.register(onnx_model_dir, kind="base")
    registry.set_production(version.version)
    return root


AppFactory = Callable[..., Any]


@pytest.fixture
async def start_app() -> AsyncIterator[AppFactory]:
    apps: list[InferenceApp] = []

    async def start(
        root: Path, wait_ready: bool = True, **limits: Any
    ) -> tuple[InferenceApp, grpc.aio.Channel]:
        settings = InferenceSettings(
            grpc={"port": 0},
            metrics={"port": 0},
            kafka_enabled=False,
            artifact_root=root,
            registry_poll_s=0.2,
            limits=LimitSettings(**limits),
        )
        app = InferenceApp(settings)
        apps.append(app)
        port = await app.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        if wait_ready:
            for _ in range(300):
                if app.router.ready:
                    break
                await asyncio.sleep(0.1)
        return app, channel

    yield start
    for app in apps:
        await app.stop(grace=5)


@pytest.fixture
async def served(start_app: AppFactory, registry_root: Path) -> tuple[InferenceApp, grpc.aio.Channel]:
    return await start_app(registry_root)


async def test_answer_is_grounded_signed_and_timed(served: tuple[InferenceApp, grpc.aio.Channel]) -> None:
    _app, channel = served
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    response = await stub.Answer(request(), timeout=120)
    assert response.answer
    assert response.model_version == "v1"
    assert QueryIdSigner(DEV_QUERY_ID_KEY).verify(response.query_id).model_version == "v1"
    assert any("LinkedIn" in p.text for p in response.passages)
    assert response.tokens.prompt_tokens > 0 and 0 < response.tokens.completion_tokens <= 16
    assert 0 < response.timing.time_to_first_token_ms <= response.timing.total_ms
    assert response.finish_reason in ("eos", "max_tokens")
    second = await stub.Answer(request(), timeout=120)
    assert second.query_id != response.query_id
    assert second.answer == response.answer  # greedy decoding is deterministic


async def test_drafted_tokens_are_counted_by_version(start_app: AppFactory, registry_root: Path) -> None:
    from prometheus_client import REGISTRY

    def drafted(outcome: str) -> float:
        labels = {"version": "v1", "outcome": outcome}
        return REGISTRY.get_sample_value("flywheel_inference_drafted_tokens_total", labels) or 0.0

    before = drafted("accepted"), drafted("rejected")
    # One candidate: the answer decodes alone from its first token, so it drafts from the page.
    _app, channel = await start_app(registry_root, answer_candidates=1)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    response = await stub.Answer(request(max_new_tokens=32), timeout=120)
    accepted, rejected = drafted("accepted") - before[0], drafted("rejected") - before[1]
    assert accepted + rejected > 0
    assert accepted < response.tokens.completion_tokens


async def test_stream_answer_streams_the_same_answer(served: tuple[InferenceApp, grpc.aio.Channel]) -> None:
    _app, channel = served
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    unary = await stub.Answer(request(max_new_tokens=24), timeout=120)
    chunks = [chunk async for chunk in stub.StreamAnswer(request(max_new_tokens=24), timeout=120)]
    assert chunks[0].query_id and chunks[0].model_version == "v1" and chunks[0].passages
    assert len([c for c in chunks if c.delta]) > 1  # tokens arrive as they are generated
    assert "".join(c.delta for c in chunks).strip() == unary.answer
    assert chunks[-1].finish_reason and chunks[-1].tokens.completion_tokens == unary.tokens.completion_tokens


async def test_health_and_reflection(served: tuple[InferenceApp, grpc.aio.Channel]) -> None:
    _app, channel = served
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "flywheel.inference.v1.InferenceService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name async for r in responses for s in r.list_services_response.service}
    assert {"flywheel.inference.v1.InferenceService", "grpc.health.v1.Health"} <= names


async def test_not_serving_until_a_model_is_loaded(start_app: AppFactory, tmp_path: Path) -> None:
    _app, channel = await start_app(tmp_path, wait_ready=False)
    await asyncio.sleep(0.5)
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await inference_pb2_grpc.InferenceServiceStub(channel).Answer(request(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def _bad(**changes: Any) -> inference_pb2.AnswerRequest:
    req = request()
    for key, value in changes.items():
        if key == "page":
            req.page.CopyFrom(value)
        elif key == "question":
            req.question = value
        else:
            setattr(req.options, key, value)
    return req


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (_bad(question="   "), "question is empty"),
        (_bad(question="why? " * 400), "question is longer"),
        (_bad(page=inference_pb2.Page(url="u")), "page has no content"),
        (_bad(page=inference_pb2.Page(text="x" * (2 * 1024 * 1024 + 1))), "page is larger"),
        (_bad(page=inference_pb2.Page(html="<script>only code</script>")), "no text"),
        (_bad(max_new_tokens=100_000), "max_new_tokens"),
        (_bad(temperature=-1.0), "temperature"),
        (_bad(temperature=float("nan")), "temperature"),
        (_bad(top_p=1.5), "top_p"),
    ],
)
async def test_bad_input_is_invalid_argument(
    served: tuple[InferenceApp, grpc.aio.Channel], bad: inference_pb2.AnswerRequest, message: str
) -> None:
    _app, channel = served
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    for call in (stub.Answer(bad, timeout=30), _drain(stub.StreamAnswer(bad, timeout=30))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (err.value.details() or "")


async def _drain(stream: Any) -> list[Any]:
    return [item async for item in stream]


async def test_full_queue_is_resource_exhausted(start_app: AppFactory, registry_root: Path) -> None:
    _app, channel = await start_app(registry_root, max_in_flight=2)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    results = await asyncio.gather(
        *(stub.Answer(request(max_new_tokens=24), timeout=120) for _ in range(8)), return_exceptions=True
    )
    codes = [r.code() if isinstance(r, grpc.aio.AioRpcError) else grpc.StatusCode.OK for r in results]
    assert codes.count(grpc.StatusCode.OK) >= 2
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    ok = await stub.Answer(request(), timeout=120)  # and it recovers
    assert ok.answer


async def test_deadline_stops_the_work(served: tuple[InferenceApp, grpc.aio.Channel]) -> None:
    app, channel = served
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    # Greedy answers are deterministic: the same request given a third of its time is cut short.
    started = time.perf_counter()
    await stub.Answer(request(max_new_tokens=256), timeout=120)
    full_s = time.perf_counter() - started
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Answer(request(max_new_tokens=256), timeout=full_s / 3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(50):  # the abandoned sequence leaves the engine
        if app.router.in_flight() == 0:
            break
        await asyncio.sleep(0.1)
    assert app.router.in_flight() == 0
    assert (await stub.Answer(request(), timeout=120)).answer


async def test_hot_swap_under_load_drops_nothing(
    start_app: AppFactory, tmp_path: Path, onnx_model_dir: Path
) -> None:
    registry = ModelRegistry(tmp_path)
    registry.set_production(registry.register(onnx_model_dir, kind="base").version)
    app, channel = await start_app(tmp_path)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    versions: list[str] = []
    stop = asyncio.Event()

    async def visitor(n: int) -> None:
        while not stop.is_set():
            response = await stub.Answer(request(max_new_tokens=8), timeout=120)
            versions.append(response.model_version)

    visitors = [asyncio.create_task(visitor(n)) for n in range(3)]
    for _ in range(600):
        if len(versions) >= 3:
            break
        await asyncio.sleep(0.1)
    staged = tmp_path / "staged"
    shutil.copytree(onnx_model_dir, staged)
    registry.set_production(registry.register(staged, kind="candidate").version, reason="test swap")
    for _ in range(600):
        if versions.count("v2") >= 3:
            break
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.gather(*visitors)  # any failed request raises here
    assert versions[0] == "v1" and versions[-1] == "v2"
    assert versions.count("v2") >= 3
    assert app.router.production_version == "v2"
