"""The candidate pipeline of the app with stub evaluations (no model, no broker): decide once,
judge against the production that serves when the gate ends, fail on a broken candidate."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client import REGISTRY

from flywheel_common.auth import Authenticator, load_tokens
from flywheel_common.dev_secrets import DEV_PSEUDONYM_KEY
from flywheel_common.errors import InvalidArgument, PermissionDenied
from flywheel_common.pseudonym import pseudonymise
from flywheel_common.query_ids import QueryIdSigner
from flywheel_common.registry import ModelRegistry
from flywheel_evaluator import reports
from flywheel_evaluator.app import EvaluatorApp
from flywheel_evaluator.consumers import CandidateConsumer
from flywheel_evaluator.evaluation import EvaluationResult, GoldenItem, GoldenSet, ItemResult, compute_metrics
from flywheel_evaluator.live import Signal
from flywheel_evaluator.rollout import Decision
from flywheel_evaluator.service import MAX_LIST, EvaluatorServicer
from flywheel_evaluator.settings import EvaluatorSettings, GateSettings
from flywheel_proto.flywheel.evaluator.v1 import evaluator_pb2
from flywheel_proto.flywheel.events.v1 import events_pb2

GOLDEN = GoldenSet("stub@0:gate", "gate", tuple(GoldenItem(f"q{i}", "?", ("a",), "a", "") for i in range(20)))


def result(version: str, right: int) -> EvaluationResult:
    items = [
        ItemResult(f"q{i}", True, "a", False, float(i < right), 1.0, float(i < right), 1.0, 1, 100.0, 50.0)
        for i in range(20)
    ]
    return EvaluationResult(version, GOLDEN.name, "fp", items, compute_metrics(items, resamples=200))


@pytest.fixture
def app(tmp_path: Path) -> EvaluatorApp:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"stub")
    settings = EvaluatorSettings(
        artifact_root=tmp_path / "artifacts",
        state_dir=tmp_path / "state",
        gate=GateSettings(policy="improve"),
    )
    app = EvaluatorApp(settings, golden=GOLDEN)
    app.registry.register(model, kind="base")
    for n in range(2, 5):
        app.registry.register(model, kind="candidate", metadata={"lineage": lineage(f"v{n}")})
    app.registry.set_production("v1")
    app.gatekeeper.decisions._emit = None  # no broker here
    return app


class StubEvaluations:
    """Accuracy per version (None: the evaluation fails); `on_evaluate` runs before each result."""

    def __init__(self, app: EvaluatorApp, right: dict[str, int | None]) -> None:
        self.right = right
        self.calls: list[str] = []
        self.on_evaluate: Any = None
        app.gatekeeper.evaluator.evaluate = self  # type: ignore[method-assign]

    def __call__(self, version: str, **_: Any) -> EvaluationResult:
        self.calls.append(version)
        if self.on_evaluate:
            self.on_evaluate(version)
        right = self.right[version]
        if right is None:
            raise RuntimeError("model.onnx is not a model")
        return result(version, right)


def lineage(version: str) -> dict[str, str]:
    """What the training job that made `version` registered it with."""
    return {"parent_version": "v1", "dataset_id": f"ds-{version}", "job_id": f"job-{version}"}


def candidate(version: str) -> events_pb2.ModelCandidate:
    """The trainer's announcement of `version`."""
    return events_pb2.ModelCandidate(version=version, **lineage(version))


def test_better_candidate_goes_canary_and_is_decided_once(app: EvaluatorApp) -> None:
    stub = StubEvaluations(app, {"v1": 5, "v2": 15})
    app.gatekeeper.process_candidate(candidate("v2"))
    [decision] = app.registry.decisions()
    assert decision["passed"] and decision["reasons"][0] == "rollout: canary at 25% of sessions"
    assert app.registry.state().canary == "v2"
    assert (app.registry.reports_dir / "v2" / "gate.md").is_file()
    app.gatekeeper.process_candidate(candidate("v2"))  # a replay
    assert len(app.registry.decisions()) == 1 and stub.calls == ["v2", "v1"]


def test_candidate_is_judged_against_the_production_that_serves_when_the_gate_ends(
    app: EvaluatorApp,
) -> None:
    stub = StubEvaluations(app, {"v1": 5, "v2": 15, "v3": 12})

    def promote_v2_meanwhile(version: str) -> None:
        if version == "v3" and app.registry.state().production == "v1":
            app.registry.set_production("v2", reason="a canary finished meanwhile")

    stub.on_evaluate = promote_v2_meanwhile
    app.gatekeeper.process_candidate(candidate("v3"))
    [decision] = app.registry.decisions()
    assert decision["baseline_version"] == "v2" and not decision["passed"]
    assert stub.calls == ["v3", "v1", "v3", "v2"]


def test_broken_candidate_fails_the_gate_with_the_reason(app: EvaluatorApp) -> None:
    StubEvaluations(app, {"v1": 5, "v4": None})
    app.gatekeeper.process_candidate(candidate("v4"))
    [decision] = app.registry.decisions()
    assert not decision["passed"]
    assert decision["reasons"] == [
        "rollout: rejected; production stays v1",
        "FAIL evaluation: candidate could not be evaluated: model.onnx is not a model",
    ]


def test_a_candidate_event_naming_no_possible_version_is_dead_lettered_not_retried(app: EvaluatorApp) -> None:
    """Retried, such an event would be refused again and again, and no later candidate gated."""
    stub = StubEvaluations(app, {"v1": 5, "v2": 15})
    consumer = CandidateConsumer(app.settings, app.gatekeeper.process_candidate, threading.Event())
    dead: list[str] = []
    consumer.dead_letter = lambda record, reason: dead.append(reason)  # type: ignore[method-assign]
    topic = app.settings.kafka.topics.candidates
    records = [
        ConsumerRecord(topic, 0, n, 0, 0, 0, b"k", candidate(version).SerializeToString(), [], None, 1, 1, -1)
        for n, version in enumerate(["v2/../v1", "x" * 200, "v1\x00", "v9", "v2"])
    ]
    consumer.handle(records)
    assert [reason.split(":")[0] for reason in dead] == [
        "ModelCandidate with a bad version name",
        "ModelCandidate with a bad version name",
        "ModelCandidate with a bad version name",
        "candidate version is not in the registry",
    ]
    assert stub.calls == ["v2", "v1"] and app.registry.state().canary == "v2"


async def test_request_ids_are_bounded(app: EvaluatorApp) -> None:
    servicer = EvaluatorServicer(app.gatekeeper, Authenticator(load_tokens(None)), DEV_PSEUDONYM_KEY)

    class Context:
        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return (("authorization", "Bearer dev-admin-token"),)

    context: Any = Context()
    for request_id in ("x" * 129, "\x1b[31mred", "a b"):
        with pytest.raises(InvalidArgument, match="request_id"):
            await servicer.Promote(evaluator_pb2.VersionRequest(version="v2", request_id=request_id), context)
    assert app.registry.state().production == "v1"
    ok = await servicer.Promote(
        evaluator_pb2.VersionRequest(version="v2", request_id="cli:" + "f" * 32), context
    )
    assert ok.production == "v2"


async def test_an_admins_reason_is_redacted_before_it_is_logged_kept_or_sent(
    app: EvaluatorApp, caplog: pytest.LogCaptureFixture
) -> None:
    servicer = EvaluatorServicer(app.gatekeeper, Authenticator(load_tokens(None)), DEV_PSEUDONYM_KEY)
    sent: list[events_pb2.GateDecision] = []
    app.gatekeeper.decisions._emit = sent.append

    class Context:
        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return (("authorization", "Bearer dev-admin-token"),)

    context: Any = Context()
    reason = "after a complaint from jane.doe@example.org, +44 20 7946 0958"
    with caplog.at_level("INFO"):
        await servicer.Promote(evaluator_pb2.VersionRequest(version="v2", reason=reason), context)
    [decision] = app.registry.decisions()
    assert decision["reasons"][0].endswith("after a complaint from [EMAIL], [PHONE]")
    for where in (json.dumps(decision), str(sent), caplog.text, app.registry.state_path.read_text()):
        assert "jane.doe" not in where and "7946" not in where


def test_only_the_trainers_own_announcement_of_a_registered_candidate_is_gated(app: EvaluatorApp) -> None:
    """Announcements are unsigned: a producer to the topic could otherwise gate any version."""
    stub = StubEvaluations(app, {"v1": 5, "v2": 15, "v3": 15, "v4": 15, "v5": 15})
    app.registry.register(app.registry.get("v1").model_dir, kind="base")  # v5: another base model
    consumer = CandidateConsumer(app.settings, app.gatekeeper.process_candidate, threading.Event())
    dead: list[str] = []
    consumer.dead_letter = lambda record, reason: dead.append(reason)  # type: ignore[method-assign]
    topic = app.settings.kafka.topics.candidates
    forged = [
        events_pb2.ModelCandidate(version="v5", parent_version="v1"),
        events_pb2.ModelCandidate(version="v3", parent_version="v1", job_id="job-v2"),
        events_pb2.ModelCandidate(version="v4"),
    ]
    claimed = events_pb2.ModelCandidate(
        version="v2", parent_version="v4", job_id="job-v2", dataset_id="made-up"
    )
    records = [
        ConsumerRecord(topic, 0, n, 0, 0, 0, b"k", event.SerializeToString(), [], None, 1, 1, -1)
        for n, event in enumerate([*forged, claimed])
    ]
    consumer.handle(records)
    assert dead == [
        "candidate refused: v5 is a base version, not a training job's candidate",
        "candidate refused: the announcement of v3 does not name the job that registered it",
        "candidate refused: the announcement of v4 does not name the job that registered it",
    ]
    assert stub.calls == ["v2", "v1"] and app.registry.state().canary == "v2"
    [decision] = app.registry.decisions()
    assert decision["version"] == "v2"
    gate = json.loads((app.registry.reports_dir / "v2" / "gate.json").read_text())
    assert {k: gate["settings"][k] for k in lineage("v2")} == lineage("v2")  # the registry's, not the event's


def test_unknown_version_is_not_found(app: EvaluatorApp) -> None:
    from flywheel_common.errors import NotFound

    with pytest.raises(NotFound):
        app.gatekeeper.process_candidate(candidate("v9"))


def test_registry_is_the_only_state(app: EvaluatorApp, tmp_path: Path) -> None:
    # A second app on the same folders sees the same rollout and decisions.
    StubEvaluations(app, {"v1": 5, "v2": 15})
    app.gatekeeper.process_candidate(candidate("v2"))
    again = ModelRegistry(tmp_path / "artifacts")
    assert again.state().canary == "v2" and len(again.decisions()) == 1


async def test_list_decisions_is_capped_whatever_the_limit(app: EvaluatorApp) -> None:
    for i in range(MAX_LIST + 20):
        app.gatekeeper.decisions.record(Decision(f"v{i}", "v1", True, "gate", [f"reason {i}"]))
    servicer = EvaluatorServicer(app.gatekeeper, Authenticator(load_tokens(None)), DEV_PSEUDONYM_KEY)

    class Context:
        def invocation_metadata(self) -> tuple[()]:
            return ()

    context: Any = Context()
    for limit in (0, MAX_LIST + 1, 2**32 - 1):
        reply = await servicer.ListDecisions(evaluator_pb2.ListDecisionsRequest(limit=limit), context)
        assert len(reply.decisions) == MAX_LIST
        assert reply.decisions[0].version == f"v{MAX_LIST + 19}"  # newest first
    two = await servicer.ListDecisions(evaluator_pb2.ListDecisionsRequest(limit=2), context)
    assert [d.version for d in two.decisions] == [f"v{MAX_LIST + 19}", f"v{MAX_LIST + 18}"]


async def test_forget_session_needs_the_admin_role_and_names_exactly_one_session(app: EvaluatorApp) -> None:
    servicer = EvaluatorServicer(app.gatekeeper, Authenticator(load_tokens(None)), DEV_PSEUDONYM_KEY)
    session = pseudonymise(DEV_PSEUDONYM_KEY, "visitor-1", domain="session")
    app.store.record([Signal("v1", time.time(), "rating", 2, query_id="q", session=session)])

    class Context:
        def __init__(self, token: str) -> None:
            self.token = token

        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return (("authorization", f"Bearer {self.token}"),)

    forget = evaluator_pb2.ForgetSessionRequest
    with pytest.raises(PermissionDenied):
        await servicer.ForgetSession(forget(session_id="visitor-1"), Context("dev-user-token"))
    admin: Any = Context("dev-admin-token")
    for bad in (forget(), forget(session_id="a", session_pseudonym=session), forget(session_pseudonym="x")):
        with pytest.raises(InvalidArgument):
            await servicer.ForgetSession(bad, admin)
    reply = await servicer.ForgetSession(forget(session_id="visitor-1"), admin)
    assert (reply.votes, reply.served) == (1, 0)
    again = await servicer.ForgetSession(forget(session_pseudonym=session), admin)
    assert (again.votes, again.served) == (0, 0)


def test_retention_prunes_rejected_candidates_and_a_rollback_to_them_is_refused(app: EvaluatorApp) -> None:
    from flywheel_common.errors import FailedPrecondition

    StubEvaluations(app, {"v1": 15, "v2": 5, "v3": 5})
    app.settings.evaluation.prefetch_production = False
    app.settings.retention.keep_latest = 1
    for version in ("v2", "v3"):
        app.gatekeeper.process_candidate(candidate(version))  # both rejected; v4 is not gated yet
    app.gatekeeper.tick()
    assert [v.version for v in app.registry.list_versions() if v.pruned] == ["v2", "v3"]
    with pytest.raises(FailedPrecondition, match="removed by retention"):
        app.gatekeeper.rollback("v2", reason="", actor="test")
    with pytest.raises(FailedPrecondition, match="removed by retention"):
        app.gatekeeper.evaluate_now("v3", "admin:test")
    assert app.registry.state().production == "v1"


def test_retention_can_be_turned_off(app: EvaluatorApp) -> None:
    StubEvaluations(app, {"v1": 15, "v2": 5})
    app.settings.evaluation.prefetch_production = False
    app.settings.retention.enabled = False
    app.gatekeeper.process_candidate(candidate("v2"))
    app.gatekeeper.tick()
    assert not any(v.pruned for v in app.registry.list_versions())


def fail_once(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> None:
    """The first call of `owner.name` fails as on a full disk; later ones work."""
    real = getattr(owner, name)
    calls: list[int] = []

    def once(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, once)


def test_a_gate_that_failed_after_its_move_is_finished_on_retry_without_moving_again(
    app: EvaluatorApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The decision log cannot be appended to after the canary started: the consumer retries.
    stub = StubEvaluations(app, {"v1": 5, "v2": 15})
    fail_once(monkeypatch, app.registry, "append_decision")
    with pytest.raises(OSError):
        app.gatekeeper.process_candidate(candidate("v2"))
    assert app.registry.state().canary == "v2" and app.registry.decisions() == []
    report = json.loads((app.registry.reports_dir / "v2" / "gate.json").read_text())
    app.store.start_canary("v2", at=1000.0)  # so a restarted window would show
    generation = app.registry.state().generation
    app.gatekeeper.process_candidate(candidate("v2"))
    [decision] = app.registry.decisions()
    assert decision["decision_id"] == report["decision_id"]
    assert decision["reasons"][0] == "rollout: canary at 25% of sessions"
    assert app.registry.state().generation == generation and app.store.canary_started("v2") == 1000.0
    assert stub.calls == ["v2", "v1"]


def test_a_candidate_promoted_before_its_record_failed_still_gets_its_gate_decision(
    app: EvaluatorApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    app.settings.canary.enabled = False  # a pass goes straight to production
    StubEvaluations(app, {"v1": 5, "v2": 15})
    fail_once(monkeypatch, app.registry, "append_decision")
    with pytest.raises(OSError):
        app.gatekeeper.process_candidate(candidate("v2"))
    assert app.registry.state().production == "v2"
    app.gatekeeper.process_candidate(candidate("v2"))
    [decision] = app.registry.decisions()
    assert decision["action"] == "gate" and decision["version"] == "v2"
    assert decision["reasons"][0] == "rollout: promoted to production (canary disabled)"
    assert app.registry.state().outbox == []


def test_a_canary_rolled_back_before_its_gate_is_retried_stays_out(
    app: EvaluatorApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    app.settings.canary.min_samples = app.settings.canary.min_signal_samples = 4
    app.settings.canary.min_duration_s = 0
    StubEvaluations(app, {"v1": 5, "v2": 15})
    fail_once(monkeypatch, app.registry, "append_decision")
    with pytest.raises(OSError):
        app.gatekeeper.process_candidate(candidate("v2"))
    started = app.store.canary_started("v2")
    app.store.record(
        [Signal("v2", started + 1, "rating", 1, query_id=f"c{i}", session=f"c{i}") for i in range(4)]
    )
    app.store.record(
        [Signal("v1", started + 1, "rating", 5, query_id=f"p{i}", session=f"p{i}") for i in range(4)]
    )
    rolled = app.gatekeeper.rollout.check_canary(now=started + 5)
    assert rolled is not None and rolled.action == "rollback"
    app.gatekeeper.process_candidate(candidate("v2"))
    state = app.registry.state()
    assert (state.production, state.canary) == ("v1", None)
    assert [(d["action"], d["version"]) for d in app.registry.decisions()] == [
        ("gate", "v2"),
        ("rollback", "v2"),
    ]


def test_a_gate_report_that_cannot_be_written_moves_nothing(
    app: EvaluatorApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The report is written just before the state write that commits the move and its decision.
    StubEvaluations(app, {"v1": 5, "v2": 15})
    fail_once(monkeypatch, reports, "write_gate")
    with pytest.raises(OSError):
        app.gatekeeper.process_candidate(candidate("v2"))
    state = app.registry.state()
    assert (state.canary, state.outbox) == (None, []) and app.registry.decisions() == []
    app.gatekeeper.process_candidate(candidate("v2"))
    assert app.registry.state().canary == "v2" and len(app.registry.decisions()) == 1


def test_a_canary_decision_kafka_did_not_acknowledge_is_sent_on_the_next_tick(app: EvaluatorApp) -> None:
    app.settings.evaluation.prefetch_production = False
    app.settings.canary.min_samples = app.settings.canary.min_signal_samples = 4
    app.settings.canary.min_duration_s = 0
    StubEvaluations(app, {"v1": 5, "v2": 15})
    sent: list[events_pb2.GateDecision] = []
    down = [False]

    def emit(event: events_pb2.GateDecision) -> None:
        if down[0]:
            raise ConnectionError("not acknowledged")
        sent.append(event)

    app.gatekeeper.decisions._emit = emit
    app.gatekeeper.process_candidate(candidate("v2"))
    now = time.time()
    app.store.start_canary("v2", at=now - 60)
    app.store.record(
        [
            Signal(v, now - 30, "rating", 4, query_id=f"{v}{i}", session=f"{v}{i}")
            for v in ("v1", "v2")
            for i in range(4)
        ]
    )
    down[0] = True
    with pytest.raises(ConnectionError):
        app.gatekeeper.tick()  # the app logs it and ticks again
    assert app.registry.state().production == "v2"
    down[0] = False
    app.gatekeeper.tick()
    app.gatekeeper.tick()
    assert [e.action for e in sent] == [
        events_pb2.DECISION_ACTION_GATE,
        events_pb2.DECISION_ACTION_CANARY_PROMOTE,
    ]


def test_the_live_gauges_count_voters_per_serving_version(app: EvaluatorApp) -> None:
    signer = QueryIdSigner(b"k" * 32)
    now = time.time()
    # Six sessions of one network and two of others thumb production's answers: three voters.
    signals = [
        Signal("v1", now, "thumbs", 1, query_id=signer.issue("v1", f"{n:032x}", network), session=f"{n:032x}")
        for n, network in enumerate(["e" * 32] * 6 + ["f" * 32, ""])
    ]
    app.gatekeeper.store.record(signals)
    app.gatekeeper.refresh_gauges()
    voters = REGISTRY.get_sample_value("flywheel_evaluator_live_voters", {"version": "v1"})
    events = REGISTRY.get_sample_value("flywheel_evaluator_live_feedback_events", {"version": "v1"})
    assert (voters, events) == (3, 3)
