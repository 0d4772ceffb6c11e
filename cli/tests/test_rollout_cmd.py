"""`flywheel rollout decisions`: its own -v shows every reason, and leaves the global -v alone."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from flywheel_cli.__main__ import main
from flywheel_cli.commands import rollout_cmd
from flywheel_proto.flywheel.evaluator.v1 import evaluator_pb2

REASONS = ["accuracy +4.0 points", "latency p95 900 ms", "no regression on unanswerable questions"]


class FakeEvaluator:
    """An evaluator that answers ListDecisions with one decision of three reasons."""

    requests: list[evaluator_pb2.ListDecisionsRequest] = []

    def __init__(self, channel: Any) -> None:
        pass

    def ListDecisions(
        self, request: evaluator_pb2.ListDecisionsRequest, timeout: float
    ) -> evaluator_pb2.ListDecisionsResponse:
        self.requests.append(request)
        decision = evaluator_pb2.Decision(version="v2", passed=True, reasons=REASONS)
        return evaluator_pb2.ListDecisionsResponse(decisions=[decision])


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[argparse.Namespace]:
    """The parsed flags of each call, which runs against FakeEvaluator."""
    monkeypatch.setattr(rollout_cmd.evaluator_pb2_grpc, "EvaluatorServiceStub", FakeEvaluator)
    calls: list[argparse.Namespace] = []
    call = rollout_cmd._call

    def recording(stub: Any, args: argparse.Namespace, metadata: Any) -> int:
        calls.append(args)
        return call(stub, args, metadata)

    monkeypatch.setattr(rollout_cmd, "_call", recording)
    return calls


def test_decisions_verbose_prints_every_reason(
    seen: list[argparse.Namespace], capsys: pytest.CaptureFixture[str]
) -> None:
    def printed() -> list[str]:
        out = capsys.readouterr().out
        return [reason for reason in REASONS if reason in out]

    assert main(["rollout", "decisions"]) == 0
    assert printed() == REASONS[:2]
    for flag in ("-v", "--verbose"):
        assert main(["rollout", "decisions", flag]) == 0
        assert printed() == REASONS


def test_the_global_verbose_flag_survives_rollout_decisions(seen: list[argparse.Namespace]) -> None:
    assert main(["-v", "rollout", "decisions", "--limit", "3"]) == 0
    assert seen[-1].verbose and not seen[-1].all_reasons
    assert FakeEvaluator.requests[-1].limit == 3
    assert main(["rollout", "decisions", "-v"]) == 0
    assert seen[-1].all_reasons and not seen[-1].verbose
