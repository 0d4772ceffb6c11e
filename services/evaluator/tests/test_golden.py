"""Golden sets: loaded from the project's dataset format, registered once in the artifact store."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from flywheel_common.registry import ModelRegistry
from flywheel_eval.dataset import load_dataset
from flywheel_evaluator.evaluation import GoldenSet, load_golden, register_golden
from flywheel_evaluator.settings import GoldenSettings


def make_set(root: Path, name: str) -> Path:
    folder = root / name
    (folder / "pages").mkdir(parents=True)
    (folder / "pages" / "p.html").write_text(
        "<html><head><title>T</title></head><body><p>The sky is blue.</p></body></html>"
    )
    rows = [
        {"id": "a", "page": "p", "question": "what colour is the sky", "answers": ["blue"], "split": "gate"},
        {"id": "b", "page": "p", "question": "who painted it", "answers": [], "split": "gate"},
        {"id": "c", "page": "p", "question": "is it blue", "answers": ["yes"], "split": "exam"},
    ]
    (folder / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def registered_base(tmp_path: Path) -> tuple[ModelRegistry, str, GoldenSet]:
    """A registry holding a base version whose model is never run, and a one-question golden set."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"not run here")
    registry = ModelRegistry(tmp_path / "artifacts")
    version = registry.register(model, kind="base").version
    return registry, version, load_golden(GoldenSettings(dataset=make_set(tmp_path, "one")))


def test_golden_sets_load_and_register(tmp_path: Path) -> None:
    first, second = make_set(tmp_path, "one"), make_set(tmp_path, "two")
    artifacts = tmp_path / "artifacts"
    golden = load_golden(GoldenSettings(dataset=first, extra_datasets=[second]), register_in=artifacts)
    assert [i.id for i in golden.items] == ["one/a", "one/b", "two/a", "two/b"]
    assert golden.items[0].page_text == "The sky is blue." and golden.items[0].title == "T"
    assert golden.answerable == 2
    version = load_dataset(first).version
    assert golden.name.startswith(f"{version}:gate+two@")
    copy = artifacts / "golden" / version
    assert load_dataset(copy).content_hash == load_dataset(first).content_hash
    # Registering again is a no-op; a limit shows in the name.
    assert register_golden(load_dataset(first), artifacts) == copy
    limited = load_golden(GoldenSettings(dataset=first, limit=1))
    assert [i.id for i in limited.items] == ["a"] and limited.name.endswith(":gate[:1]")


def test_a_stored_evaluation_is_not_reused_once_the_prompt_is_laid_out_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flywheel_evaluator import evaluation
    from flywheel_evaluator.settings import EvaluationSettings

    registry, version, golden = registered_base(tmp_path)
    evaluator = evaluation.Evaluator(registry, golden, EvaluationSettings())
    before = evaluator.fingerprint(version)
    assert evaluator.fingerprint(version) == before

    def question_last(title: str, passages: Any, question: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"{title} {' '.join(p.text for p in passages)} {question}"}]

    monkeypatch.setattr(evaluation, "build_messages", question_last)
    assert evaluator.fingerprint(version) != before


def test_the_started_gauge_is_set_during_an_evaluation_and_cleared_after(tmp_path: Path) -> None:
    from prometheus_client import REGISTRY

    from flywheel_evaluator import evaluation
    from flywheel_evaluator.settings import EvaluationSettings

    name = "flywheel_evaluator_evaluation_started_timestamp_seconds"
    registry, version, golden = registered_base(tmp_path)
    evaluator = evaluation.Evaluator(registry, golden, EvaluationSettings(reuse_results=False))
    seen: list[float | None] = []

    def failing_run(*_: Any) -> evaluation.EvaluationResult:
        seen.append(REGISTRY.get_sample_value(name))
        raise RuntimeError("the model would not load")

    evaluator._run = failing_run  # type: ignore[method-assign]
    error_labels = {"outcome": "error"}
    errors = REGISTRY.get_sample_value("flywheel_evaluator_evaluations_total", error_labels) or 0
    started = time.time()
    with pytest.raises(RuntimeError):
        evaluator.evaluate(version)
    assert seen and seen[0] is not None and started - 1 <= seen[0] <= time.time()
    # Cleared however the evaluation ends, so an error is not mistaken for one still running.
    assert REGISTRY.get_sample_value(name) == 0
    assert REGISTRY.get_sample_value("flywheel_evaluator_evaluations_total", error_labels) == errors + 1
