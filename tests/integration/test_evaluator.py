"""The evaluator with the real model and a real broker: a candidate that is not worse goes canary ->
production and inference follows; a damaged candidate is rejected with reasons; a canary with bad live
ratings is rolled back, by many sessions but not by one; an admin rolls back to any earlier version
and inference follows."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from kafka.consumer.fetcher import ConsumerRecord

from flywheel_cli.__main__ import main as cli
from flywheel_common.dev_secrets import DEV_EVENT_SIGNING_KEY, DEV_PSEUDONYM_KEY, DEV_QUERY_ID_KEY
from flywheel_common.event_signing import SIGNATURE_HEADER, EventSigner
from flywheel_common.kafka import EventProducer, decode, event_headers
from flywheel_common.pseudonym import pseudonymise
from flywheel_common.query_ids import QueryIdSigner
from flywheel_common.registry import ModelRegistry
from flywheel_common.settings import KafkaSettings
from flywheel_eval.dataset import load_dataset
from flywheel_evaluator.app import EvaluatorApp
from flywheel_evaluator.evaluation import EVALUATION_JSON, Evaluator, load_golden
from flywheel_evaluator.settings import EvaluatorSettings, GoldenSettings
from flywheel_feedback.app import FeedbackApp
from flywheel_feedback.settings import FeedbackSettings
from flywheel_inference.app import InferenceApp
from flywheel_inference.settings import InferenceSettings
from flywheel_proto.flywheel.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from flywheel_proto.flywheel.events.v1 import events_pb2
from flywheel_proto.flywheel.feedback.v1 import feedback_pb2, feedback_pb2_grpc
from flywheel_proto.flywheel.inference.v1 import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ADMIN = (("authorization", "Bearer dev-admin-token"),)
USER = (("authorization", "Bearer dev-user-token"),)
# Gate questions of the bundled dataset: ones the base model answers right, ones it misses, and
# unanswerable ones (the safety check). Few, so an evaluation takes seconds, not minutes.
GOLDEN_IDS = (
    "design-031",
    "library-017",
    "programming-035",
    "extending-004",
    "design-029",
    "programming-014",
    "design-017",
    "general-018",
)


@pytest.fixture(scope="module")
def golden_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small golden set cut from the bundled dataset's gate split (pages copied as they are)."""
    source = load_dataset(REPO / "datasets" / "python-faq")
    gate = {item.id: item for item in source.split("gate")}
    unanswerable = [item.id for item in gate.values() if not item.answerable][:2]
    chosen = [gate[i] for i in (*GOLDEN_IDS, *unanswerable) if i in gate]
    assert len(chosen) >= 8, "the bundled gate split changed; pick other GOLDEN_IDS"
    root = tmp_path_factory.mktemp("golden") / "mini-faq"
    (root / "pages").mkdir(parents=True)
    for page in {item.page for item in chosen}:
        shutil.copy(source.root / "pages" / f"{page}.html", root / "pages" / f"{page}.html")
    lines = [
        json.dumps(
            {"id": i.id, "page": i.page, "question": i.question, "answers": list(i.answers), "split": "gate"}
        )
        for i in chosen
    ]
    (root / "qa.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def damaged_model(tmp_path_factory: pytest.TempPathFactory, onnx_model_dir: Path) -> Path:
    """The base model with noise on every transformer weight matrix: it answers, badly.

    The noise goes into the exported ONNX weights directly; re-exporting a perturbed Hugging Face
    folder gives the same kind of model but costs minutes of a 2-core machine.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    out = tmp_path_factory.mktemp("damaged") / "onnx"
    shutil.copytree(onnx_model_dir, out, ignore=shutil.ignore_patterns("model.onnx", "model.onnx.data"))
    model = onnx.load(str(onnx_model_dir / "model.onnx"))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        if init.name.startswith("model.layers.") and init.name.endswith("MatMul.weight"):
            weight = numpy_helper.to_array(init)
            noise = rng.standard_normal(weight.shape, dtype=np.float32) * weight.std() * 0.6
            init.CopyFrom(numpy_helper.from_array((weight + noise).astype(np.float32), init.name))
    onnx.save_model(
        model,
        str(out / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
    )
    return out


@pytest.fixture(scope="module")
def base_evaluation(tmp_path_factory: pytest.TempPathFactory, golden_dir: Path, onnx_model_dir: Path) -> Path:
    """The base model's evaluation on the small golden set, made once and copied into each registry
    (the evaluator reuses it there: same model files, same golden set, same settings)."""
    registry = ModelRegistry(tmp_path_factory.mktemp("base-eval"))
    registry.register(onnx_model_dir, kind="base")
    settings = evaluator_settings(golden_dir, registry.root, registry.root / "state", None)
    Evaluator(registry, load_golden(settings.golden), settings.evaluation).evaluate("v1")
    return registry.reports_dir / "v1" / EVALUATION_JSON


def evaluator_settings(
    golden: Path, root: Path, state_dir: Path, kafka: KafkaSettings | None, **overrides: Any
) -> EvaluatorSettings:
    values: dict[str, Any] = {
        "grpc": {"port": 0, "grace_s": 1},
        "metrics": {"port": 0},
        "artifact_root": root,
        "state_dir": state_dir,
        "golden": GoldenSettings(dataset=golden),
        # Short answers keep each evaluation to seconds; the chosen questions are answered early.
        "evaluation": {
            "concurrency": 10,
            "max_batch": 10,
            "max_new_tokens": 32,
            "prefetch_production": False,
        },
        "gate": {"policy": "no_regression", "latency_p95_slo_ms": 600_000},
        "canary": {
            "fraction": 0.5,
            "min_samples": 4,
            "min_signal_samples": 4,
            "min_duration_s": 1,
            "max_duration_s": 300,
            "check_interval_s": 0.3,
        },
        "consumer_group": f"test-evaluator-{uuid.uuid4().hex[:8]}",
    }
    if kafka is not None:
        values["kafka"] = kafka
    values.update(overrides)
    return EvaluatorSettings(**values)


class Stack:
    """A registry with the base model as v1 (production), an evaluator, optionally inference."""

    def __init__(self, root: Path, kafka: KafkaSettings, golden: Path) -> None:
        self.root, self.kafka, self.golden = root, kafka, golden
        self.registry = ModelRegistry(root / "artifacts")
        self.evaluator: EvaluatorApp | None = None
        self.evaluator_port = 0
        self.inference: InferenceApp | None = None
        self.feedback: FeedbackApp | None = None
        self.channels: list[grpc.aio.Channel] = []
        self.producer = EventProducer(kafka, linger_ms=0, max_block_ms=5000)

    def register(self, onnx_dir: Path, kind: str = "candidate") -> str:
        """Registers as a training job would (a candidate with the lineage `candidate` announces)."""
        lineage = {"parent_version": "v1", "dataset_id": "", "job_id": "test"}
        metadata = {"lineage": lineage} if kind == "candidate" else None
        return self.registry.register(onnx_dir, kind=kind, metadata=metadata).version

    async def start_evaluator(self, **overrides: Any) -> evaluator_pb2_grpc.EvaluatorServiceStub:
        settings = evaluator_settings(
            self.golden, self.registry.root, self.root / "evaluator", self.kafka, **overrides
        )
        self.evaluator = EvaluatorApp(settings)
        port = self.evaluator_port = await self.evaluator.start()
        await asyncio.wait_for(self.evaluator.ready.wait(), 60)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.channels.append(channel)
        return evaluator_pb2_grpc.EvaluatorServiceStub(channel)

    async def start_inference(self) -> inference_pb2_grpc.InferenceServiceStub:
        settings = InferenceSettings(
            grpc={"port": 0},
            metrics={"port": 0},
            kafka_enabled=False,
            artifact_root=self.registry.root,
            registry_poll_s=0.2,
        )
        self.inference = InferenceApp(settings)
        port = await self.inference.start()
        await until(
            lambda: self.inference is not None and self.inference.router.ready, 120, "inference ready"
        )
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.channels.append(channel)
        return inference_pb2_grpc.InferenceServiceStub(channel)

    async def start_feedback(self) -> feedback_pb2_grpc.FeedbackServiceStub:
        settings = FeedbackSettings(
            grpc={"port": 0, "grace_s": 1},
            metrics={"port": 0},
            kafka=self.kafka,
            rate_limit={"per_second": 0},
            privacy={"presidio": False},
        )
        self.feedback = FeedbackApp(settings)
        port = await self.feedback.start()
        await asyncio.wait_for(self.feedback.ready.wait(), 30)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.channels.append(channel)
        return feedback_pb2_grpc.FeedbackServiceStub(channel)

    def send(
        self, topic: str, key: str, message: Any, headers: list[tuple[str, bytes]] | None = None
    ) -> None:
        if not self.producer.connected:
            self.producer.connect()
        self.producer.send(topic, key, message, headers).get(timeout=10)

    def candidate(self, version: str) -> None:
        event = events_pb2.ModelCandidate(version=version, parent_version="v1", job_id="test")
        event.created_at.GetCurrentTime()
        self.send(self.kafka.topics.candidates, version, event)

    def ratings(self, version: str, values: list[int]) -> None:
        for value in values:
            event = events_pb2.Feedback(
                feedback_id=uuid.uuid4().hex,
                query_id=uuid.uuid4().hex,
                kind=events_pb2.FEEDBACK_KIND_RATING,
                value=value,
                model_version=version,
                # Each rating from a session of its own: the canary counts sessions, not events.
                submitter_pseudonym=uuid.uuid4().hex,
            )
            event.created_at.GetCurrentTime()
            # Signed as the feedback service signs it: the evaluator counts nothing else.
            topic = self.kafka.topics.feedback
            signature = EventSigner(DEV_EVENT_SIGNING_KEY).sign(
                topic, event.query_id.encode(), event.SerializeToString()
            )
            self.send(topic, event.query_id, event, [*event_headers(event), (SIGNATURE_HEADER, signature)])

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        if self.evaluator is not None:
            await self.evaluator.stop(grace=1)
        if self.inference is not None:
            await self.inference.stop(grace=1)
        if self.feedback is not None:
            await self.feedback.stop(grace=1)
        self.producer.close()


@pytest.fixture
async def stack(
    tmp_path: Path,
    kafka_settings: KafkaSettings,
    golden_dir: Path,
    onnx_model_dir: Path,
    base_evaluation: Path,
) -> AsyncIterator[Stack]:
    s = Stack(tmp_path, kafka_settings, golden_dir)
    s.registry.set_production(s.register(onnx_model_dir, kind="base"))
    (s.registry.reports_dir / "v1").mkdir(parents=True, exist_ok=True)
    shutil.copy(base_evaluation, s.registry.reports_dir / "v1" / EVALUATION_JSON)
    yield s
    await s.close()


async def until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Polls `check` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.2)


def decisions(stack: Stack, action: str, version: str) -> list[dict[str, Any]]:
    return [d for d in stack.registry.decisions() if d["action"] == action and d["version"] == version]


def decision_events(records: list[ConsumerRecord]) -> list[events_pb2.GateDecision]:
    return [decode(r, events_pb2.GateDecision) for r in records]


PAGE = (REPO / "datasets" / "python-faq" / "pages" / "design.html").read_text()


async def ask(stub: inference_pb2_grpc.InferenceServiceStub, session: str) -> inference_pb2.AnswerResponse:
    request = inference_pb2.AnswerRequest(
        page=inference_pb2.Page(url="https://docs.python.org/3/faq/design.html", html=PAGE),
        question="Why is there a colon after if?",
        session_id=session,
        options=inference_pb2.GenerationOptions(max_new_tokens=4),
    )
    return await stub.Answer(request, timeout=120)


async def test_not_worse_candidate_goes_canary_then_production_and_inference_follows(
    stack: Stack, onnx_model_dir: Path, read_topic: Callable[..., list[ConsumerRecord]]
) -> None:
    evaluator = await stack.start_evaluator()
    inference = await stack.start_inference()
    version = stack.register(onnx_model_dir)  # same weights: not worse (policy no_regression)
    stack.candidate(version)
    gate = await until(lambda: decisions(stack, "gate", version), 240, "the gate decision")
    assert gate[0]["passed"], gate[0]["reasons"]
    assert gate[0]["reasons"][0] == "rollout: canary at 50% of sessions"
    assert any(r.startswith("pass f1: +0.0 pts") for r in gate[0]["reasons"])
    assert gate[0]["metrics"]["f1_diff"] == 0.0
    state = stack.registry.state()
    assert (state.production, state.canary, state.canary_fraction) == ("v1", version, 0.5)

    # Inference follows the split: sessions land on both versions, each always on the same one.
    app = stack.inference
    assert app is not None
    await until(lambda: app.router.canary_version == version, 60, "inference to load the canary")
    seen = {s: (await ask(inference, s)).model_version for s in (f"visitor-{i}" for i in range(8))}
    assert set(seen.values()) == {"v1", version}
    assert (await ask(inference, "visitor-0")).model_version == seen["visitor-0"]

    # Good live ratings on both sides: the canary is promoted, and inference serves it to everyone.
    stack.ratings(version, [4, 5, 4, 4])
    stack.ratings("v1", [4, 4, 3, 4])
    promoted = await until(lambda: decisions(stack, "canary_promote", version), 60, "the canary promotion")
    assert promoted[0]["passed"] and promoted[0]["reasons"][0].startswith("not worse: mean rating 4.25")
    assert stack.registry.state().production == version
    await until(
        lambda: app.router.production_version == version and app.router.canary_version is None, 60, "swap"
    )
    assert {(await ask(inference, f"visitor-{i}")).model_version for i in range(4)} == {version}

    # The golden set is registered in the artifact store; reports next to the version, over gRPC
    # too; decisions on Kafka and over gRPC.
    assert [p.name for p in (stack.registry.root / "golden").iterdir()] == [
        load_dataset(stack.golden).version
    ]
    folder = stack.registry.reports_dir / version
    assert {"evaluation.json", "evaluation.md", "gate.json", "gate.md"} <= {p.name for p in folder.iterdir()}
    report = await evaluator.GetReport(evaluator_pb2.GetReportRequest(version=version), timeout=10)
    assert report.questions == len(load_golden(GoldenSettings(dataset=stack.golden)).items)
    assert (
        report.metrics["accuracy"].ci_low
        <= report.metrics["accuracy"].value
        <= report.metrics["accuracy"].ci_high
    )
    assert report.summary.startswith(f"# Gate: {version} PASSED")
    events = decision_events(read_topic(stack.kafka.topics.decisions, expected=2))
    assert [(e.action, e.outcome) for e in events] == [
        (events_pb2.DECISION_ACTION_GATE, events_pb2.GATE_OUTCOME_PASSED),
        (events_pb2.DECISION_ACTION_CANARY_PROMOTE, events_pb2.GATE_OUTCOME_PASSED),
    ]
    listed = await evaluator.ListDecisions(evaluator_pb2.ListDecisionsRequest(), timeout=10)
    assert [d.action for d in listed.decisions] == [
        events_pb2.DECISION_ACTION_CANARY_PROMOTE,
        events_pb2.DECISION_ACTION_GATE,
    ]


async def test_damaged_candidate_is_rejected_with_reasons(
    stack: Stack, damaged_model: Path, read_topic: Callable[..., list[ConsumerRecord]]
) -> None:
    await stack.start_evaluator()
    version = stack.register(damaged_model)
    stack.candidate(version)
    gate = await until(lambda: decisions(stack, "gate", version), 240, "the gate decision")
    assert not gate[0]["passed"]
    reasons = gate[0]["reasons"]
    assert reasons[0] == "rollout: rejected; production stays v1"
    assert reasons[1].startswith("FAIL f1: -"), reasons
    assert gate[0]["metrics"]["f1_diff"] < 0
    state = stack.registry.state()
    assert (state.production, state.canary) == ("v1", None)
    report = json.loads((stack.registry.reports_dir / version / "gate.json").read_text())
    assert report["changed"] and not report["passed"]
    [event] = decision_events(read_topic(stack.kafka.topics.decisions, expected=1))
    assert (event.version, event.outcome) == (version, events_pb2.GATE_OUTCOME_FAILED)
    assert list(event.reasons) == reasons
    # The same candidate event again (a replay) decides nothing new.
    stack.candidate(version)
    await asyncio.sleep(2)
    assert len(decisions(stack, "gate", version)) == 1


async def test_canary_with_bad_live_ratings_is_rolled_back(
    stack: Stack, onnx_model_dir: Path, read_topic: Callable[..., list[ConsumerRecord]]
) -> None:
    evaluator = await stack.start_evaluator()
    version = stack.register(onnx_model_dir)
    stack.registry.set_canary(version, 0.5, reason="test canary")
    stack.ratings(version, [1, 2, 1, 1, 2])
    stack.ratings("v1", [4, 5, 4, 4, 5])
    rolled = await until(lambda: decisions(stack, "rollback", version), 60, "the automatic rollback")
    assert not rolled[0]["passed"]
    # It is decided as soon as both sides have the minimum sample, perhaps before every rating is in.
    assert rolled[0]["reasons"][0].startswith("worse than production: mean rating 1.")
    assert (
        rolled[0]["metrics"]["canary_mean_rating"] < 2 < 4 <= rolled[0]["metrics"]["production_mean_rating"]
    )
    state = stack.registry.state()
    assert (state.production, state.canary) == ("v1", None)
    rollout = await evaluator.GetRollout(evaluator_pb2.GetRolloutRequest(), timeout=10)
    assert rollout.production == "v1" and not rollout.canary
    assert "rolled back on live signals" in rollout.history[-1]
    [event] = decision_events(read_topic(stack.kafka.topics.decisions, expected=1))
    assert (event.action, event.outcome) == (
        events_pb2.DECISION_ACTION_ROLLBACK,
        events_pb2.GATE_OUTCOME_FAILED,
    )


async def test_admin_rolls_back_to_any_earlier_version_and_inference_follows(
    stack: Stack, onnx_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluator = await stack.start_evaluator()
    inference = await stack.start_inference()
    v2, v3 = stack.register(onnx_model_dir), stack.register(onnx_model_dir)
    request = evaluator_pb2.VersionRequest(version=v3, reason="hotfix")
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await evaluator.Promote(request, metadata=USER, timeout=10)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await evaluator.Promote(request, timeout=10)
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await evaluator.Promote(evaluator_pb2.VersionRequest(version=v2), metadata=ADMIN, timeout=10)
    rollout = await evaluator.Promote(request, metadata=ADMIN, timeout=10)
    assert rollout.production == v3
    app = stack.inference
    assert app is not None
    await until(lambda: app.router.production_version == v3, 60, "inference to serve v3")

    started = time.monotonic()
    back = evaluator_pb2.VersionRequest(version="v1", reason="v2 and v3 rate badly")
    rollout = await evaluator.Rollback(back, metadata=ADMIN, timeout=10)
    assert rollout.production == "v1" and not rollout.canary
    await until(lambda: app.router.production_version == "v1", 30, "inference to roll back")
    assert time.monotonic() - started < 30
    assert (await ask(inference, "visitor-1")).model_version == "v1"
    last = stack.registry.decisions()[-1]
    assert (last["action"], last["version"], last["baseline_version"]) == ("rollback", v3, "v1")
    assert last["reasons"][0].endswith(": v2 and v3 rate badly")

    # Pin holds production; an unknown version is NOT_FOUND.
    await evaluator.Pin(evaluator_pb2.VersionRequest(version=v2), metadata=ADMIN, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as pinned:
        await evaluator.Rollback(back, metadata=ADMIN, timeout=10)
    assert pinned.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await evaluator.Pin(evaluator_pb2.VersionRequest(version="v99"), metadata=ADMIN, timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    rollout = await evaluator.SetAutoRollout(
        evaluator_pb2.SetAutoRolloutRequest(enabled=False), metadata=ADMIN
    )
    assert rollout.pinned and not rollout.auto_rollout and rollout.production == v2

    # The admin CLI drives the same RPCs.
    target = ["rollout", "--target", f"127.0.0.1:{stack.evaluator_port}"]
    capsys.readouterr()
    assert await asyncio.to_thread(cli, [*target, "unpin", "--reason", "freeze over"]) == 0
    assert await asyncio.to_thread(cli, [*target, "rollback", "v1"]) == 0
    assert await asyncio.to_thread(cli, [*target, "--token", "dev-user-token", "auto", "on"]) == 1
    assert await asyncio.to_thread(cli, [*target, "status"]) == 0
    assert await asyncio.to_thread(cli, [*target, "decisions", "--limit", "2"]) == 0
    out, err = capsys.readouterr()
    assert "production:   v1" in out and "auto-rollout: off" in out and "pinned:       no" in out
    assert "refused the token: this call needs the admin role" in err
    assert f"rollback          {v2} vs v1: failed" in out
    await until(lambda: app.router.production_version == "v1", 30, "inference to follow the CLI")


async def thumbs(
    feedback: feedback_pb2_grpc.FeedbackServiceStub, answer: inference_pb2.AnswerResponse, up: bool, key: str
) -> None:
    request = feedback_pb2.SubmitFeedbackRequest(query_id=answer.query_id, thumbs_up=up, idempotency_key=key)
    await feedback.SubmitFeedback(request, metadata=USER, timeout=30)


async def visitors(
    inference: inference_pb2_grpc.InferenceServiceStub, prefix: str, versions: dict[str, int]
) -> dict[str, list[inference_pb2.AnswerResponse]]:
    """Answers to new sessions (one question each) until each version has its count of them."""
    got: dict[str, list[inference_pb2.AnswerResponse]] = {v: [] for v in versions}
    for i in range(200):
        if all(len(got[v]) >= n for v, n in versions.items()):
            return got
        answer = await ask(inference, f"{prefix}-{i}")
        if len(got[answer.model_version]) < versions[answer.model_version]:
            got[answer.model_version].append(answer)
    raise AssertionError(f"the canary split never gave {versions}")


async def test_one_session_cannot_roll_back_a_good_canary_but_many_sessions_can(
    stack: Stack, onnx_model_dir: Path
) -> None:
    """The attack of issue 12: ten thumbs down from one visitor (the public user token) on a canary
    answer rolled back a good canary; the canary now counts sessions, so it is promoted, while a
    canary that many distinct sessions dislike is still rolled back. Many sessions made from one
    network count once."""
    await stack.start_evaluator()
    inference = await stack.start_inference()
    feedback = await stack.start_feedback()
    app, evaluator = stack.inference, stack.evaluator
    assert app is not None and evaluator is not None
    good = stack.register(onnx_model_dir)
    stack.registry.set_canary(good, 0.5, reason="test canary")
    await until(lambda: app.router.canary_version == good, 60, "inference to load the canary")

    # The attacker finds a session on the canary, asks three times and votes each answer down, the
    # first ten times (ids of its own for each vote, so none is a retry), and names other sessions.
    attacker = None
    for i in range(100):
        answer = await ask(inference, f"attacker-{i}")
        if answer.model_version == good:
            attacker = f"attacker-{i}"
            break
    assert attacker is not None
    answers = [answer] + [await ask(inference, attacker) for _ in range(2)]
    assert {a.model_version for a in answers} == {good}
    for n in range(10):
        await thumbs(feedback, answers[0], False, f"attack-{n}")
    for n, other in enumerate(answers[1:]):
        request = feedback_pb2.SubmitFeedbackRequest(
            query_id=other.query_id, thumbs_up=False, session_id=f"someone-{n}", idempotency_key=f"o-{n}"
        )
        await feedback.SubmitFeedback(request, metadata=USER, timeout=30)
    # Production's honest visitors: four up, one down (a 20% thumbs-down rate).
    honest = await visitors(inference, "visitor", {"v1": 5, good: 0})
    for n, answer in enumerate(honest["v1"]):
        await thumbs(feedback, answer, n > 0, f"honest-{n}")
    await until(
        lambda: (
            evaluator.store.stats("v1", 0).sessions == 5 and evaluator.store.stats(good, 0).thumbs_down == 1
        ),
        120,  # the consumers poll on a loaded machine; the counts, not the wait, are the test
        "the evaluator to count the votes",
    )
    # Counted per event, the attack was 12 of 12 canary votes down against 1 of 5: a rollback.
    await asyncio.sleep(2)
    assert not decisions(stack, "rollback", good)
    # Four honest canary sessions vote up: 1 of 5 sessions down on each side, and it is promoted.
    canary_visitors = await visitors(inference, "canary-visitor", {"v1": 0, good: 4})
    for n, answer in enumerate(canary_visitors[good]):
        await thumbs(feedback, answer, True, f"canary-{n}")
    promoted = await until(lambda: decisions(stack, "canary_promote", good), 60, "the canary promotion")
    # Decided at four or five canary sessions, the attacker's three answers and ten votes among them as one.
    assert promoted[0]["metrics"]["canary_sessions"] in (4, 5)
    assert not decisions(stack, "rollback", good)

    # A canary that many distinct sessions dislike is still rolled back. Their answers' ids are
    # signed as inference signs them (development keys), which spares the loaded model the asking.
    assert stack.inference is not None
    await stack.inference.stop(grace=1)
    stack.inference = None
    disliked = stack.register(onnx_model_dir)
    stack.registry.set_canary(disliked, 0.5, reason="test canary")
    signer = QueryIdSigner(DEV_QUERY_ID_KEY)
    for n in range(5):
        for version, up in ((good, True), (disliked, False)):
            session = pseudonymise(DEV_PSEUDONYM_KEY, f"second-{version}-{n}", domain="session")
            answer = inference_pb2.AnswerResponse(query_id=signer.issue(version, session))
            await thumbs(feedback, answer, up, f"second-{version}-{n}")
    rolled = await until(lambda: decisions(stack, "rollback", disliked), 60, "the rollback")
    assert "thumbs-down rate 100.0% vs production" in rolled[0]["reasons"][0]
    assert stack.registry.state().production == good

    # Sessions are free to make, but their network is not: twenty sessions asked from one network
    # (which the gateway names in each question) are one voter, and cannot roll a canary back.
    third = stack.register(onnx_model_dir)
    stack.registry.set_canary(third, 0.5, reason="test canary")

    def answer_of(version: str, session: str, network: str) -> inference_pb2.AnswerResponse:
        pseudonyms = (
            pseudonymise(DEV_PSEUDONYM_KEY, session, domain="session"),
            pseudonymise(DEV_PSEUDONYM_KEY, network, domain="network"),
        )
        return inference_pb2.AnswerResponse(query_id=signer.issue(version, *pseudonyms))

    for n in range(20):
        await thumbs(feedback, answer_of(third, f"scripted-{n}", "198.51.100.0/24"), False, f"scripted-{n}")
    await until(lambda: evaluator.store.stats(third, 0).thumbs_down == 1, 60, "the scripted votes counted")
    assert evaluator.store.stats(third, 0).sessions == 1
    await asyncio.sleep(2)
    assert not decisions(stack, "rollback", third)
    # Visitors of networks of their own: five on production, ten on the canary, all up.
    for n in range(10):
        for version in (good, third) if n < 5 else (third,):
            up = answer_of(version, f"third-{version}-{n}", f"203.0.{n}.0/24")
            await thumbs(feedback, up, True, f"third-{version}-{n}")
    await until(lambda: decisions(stack, "canary_promote", third), 60, "the third canary's promotion")
    assert not decisions(stack, "rollback", third)
