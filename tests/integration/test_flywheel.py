"""The whole flywheel, reduced: one round of simulated visitors against the real stack, end to end."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import onnx
import pytest

from flywheel_cli.local.kafka_broker import LocalBroker
from flywheel_cli.local.stack import LocalStack, StackConfig, check_health
from flywheel_cli.simulation import report
from flywheel_cli.simulation.simulate import Simulation, SimulationConfig, Targets
from flywheel_common.files import repo_root
from flywheel_common.registry import ModelRegistry
from flywheel_common.settings import KafkaSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATASET = repo_root() / "datasets" / "python-faq"


def _tiny_round_env(group: str) -> dict[str, dict[str, str]]:
    """A training job of one optimizer step on one example, a small golden set, no canary, short answers."""
    return {
        "inference": {"FLYWHEEL_INFERENCE_LIMITS__DEFAULT_MAX_NEW_TOKENS": "32"},
        "trainer": {
            "FLYWHEEL_TRAINER_CONSUMER__GROUP_ID": f"trainer-{group}",
            "FLYWHEEL_TRAINER_JOB_HYPER__MAX_STEPS": "1",
            "FLYWHEEL_TRAINER_JOB_HYPER__EPOCHS": "1",
            "FLYWHEEL_TRAINER_JOB_HYPER__GRADIENT_ACCUMULATION": "1",
            "FLYWHEEL_TRAINER_JOB_HYPER__REPLAY_FRACTION": "0",
            "FLYWHEEL_TRAINER_JOB_HYPER__PREFERENCE_WEIGHT": "0.5",
            "FLYWHEEL_TRAINER_JOB_HYPER__UNGROUNDED": "abstain",
            "FLYWHEEL_TRAINER_JOB_VERIFY__PROMPTS": "1",
            "FLYWHEEL_TRAINER_JOB_VERIFY__MAX_NEW_TOKENS": "8",
        },
        "evaluator": {
            "FLYWHEEL_EVALUATOR_CONSUMER_GROUP": f"evaluator-{group}",
            "FLYWHEEL_EVALUATOR_GOLDEN__LIMIT": "8",
            "FLYWHEEL_EVALUATOR_EVALUATION__MAX_NEW_TOKENS": "32",
            "FLYWHEEL_EVALUATOR_CANARY__ENABLED": "false",
        },
    }


def test_one_round_trains_gates_and_reports(
    kafka_broker: LocalBroker, kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    started = time.monotonic()
    config = StackConfig(
        var_dir=tmp_path / "var",
        kafka_bootstrap=kafka_broker.bootstrap_servers,
        topics=kafka_settings.topics,
        dataset=DATASET,
        free_ports=True,
        service_env=_tiny_round_env(uuid.uuid4().hex[:8]),
        precision="gguf_a8",  # the GGUF's own blocks, 8-bit activations: the longest export path
    )
    with LocalStack(config) as stack:
        assert set(stack.targets) == {"inference", "feedback", "trainer", "evaluator"}
        assert all(check_health(target) for target in stack.targets.values())
        t = stack.targets
        simulation = Simulation(
            SimulationConfig(
                dataset=DATASET,
                rounds=1,
                questions_per_round=8,
                exam_questions=6,
                correction_share=1.0,
                closing_visitors=False,
                trigger_after_s=3,
                targets=Targets(t["inference"], t["feedback"], t["trainer"], t["evaluator"]),
            )
        )
        result = asyncio.run(simulation.run())
        print(f"stack up in {stack.startup_s:.0f} s; round timings {result.rounds[1].timings_s}")
        registry = ModelRegistry(config.artifact_root)

    base, first = result.rounds
    assert base.model_version == "v1" and base.exam.n == 6
    # A candidate was trained from the round's feedback ...
    assert first.traffic["asked"] == 8 and first.traffic["corrections"] >= 1
    (job,) = first.jobs
    assert job["state"] == "SUCCEEDED", job
    candidate = job["candidate_version"]
    assert registry.get(candidate).manifest["kind"] == "candidate"
    # The base is served as its GGUF's blocks, and so is the candidate: the matrices the fine-tune
    # left alone (the tied embedding and output projection) are blocks again, verified with fp32
    # activations and then switched to 8-bit ones.
    assert registry.get("v1").manifest["prepared"]["export"]["precision"] == "gguf_a8"
    export = registry.get(candidate).manifest["export"]
    assert export["precision"] == "gguf_a8" and export["gguf"]["path"].endswith(".gguf")
    graph = onnx.load(str(registry.get(candidate).model_dir / "model.onnx"), load_external_data=False)
    levels = [
        a.i
        for n in graph.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    ]
    assert levels and set(levels) == {4}
    # Its targets were shaped into passage spans (ungrounded corrections into abstentions), and
    # corrections paired with the answers they replaced.
    training = registry.get(candidate).manifest["training"]
    targets, hyper = training["targets"], training["hyperparameters"]
    # (the batch may be cut before the round's last corrections arrive: at least one was shaped)
    assert targets["grounded"] + targets["ungrounded"] >= 1
    assert targets["ungrounded"] == targets["abstained"] + targets["dropped"]
    assert hyper["target"] == "grounded_span" and hyper["ungrounded"] == "abstain"
    assert "preference_pairs" in training
    # ... evaluated on the golden set and decided on, and the decision reached the report.
    gate = [d for d in first.decisions if d["version"] == candidate and d["action"] == "gate"]
    assert len(gate) == 1 and gate[0]["reasons"]
    assert candidate in first.gate
    # The exam ran on whatever serves after the round: the candidate if it passed, else the base.
    assert first.model_version == (candidate if gate[0]["passed"] else "v1")
    assert set(first.exam.versions) == {first.model_version}

    folder = report.write(result, tmp_path / "reports")
    data = json.loads((folder / "report.json").read_text())
    assert [r["round"] for r in data["rounds"]] == [0, 1]
    assert (folder / "report.md").read_text().startswith("# Flywheel simulation")
    assert (folder / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert time.monotonic() - started < 600
