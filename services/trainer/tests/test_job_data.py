"""Training data: the serving prompt plus the answer's tokens up to the stop token; carry-over of
batches the base has not learned; replay selection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flywheel_common.registry import ModelRegistry
from flywheel_model.prompt import PromptEncoder, build_messages
from flywheel_model.retrieval import Passage
from flywheel_model.runtime import DecoderSpec
from flywheel_trainer import datasets
from flywheel_trainer.job import data


def example(i: int, question: str = "", answer: str = "") -> dict[str, Any]:
    return {
        "id": f"c-{i}",
        "source": "correction",
        "query_id": f"q{i}",
        "page_title": "Widgets",
        "passages": [f"Widget {i} is blue.", "Widgets are sold in shops."],
        "question": question or f"What colour is widget {i}?",
        "answer": answer or f"Widget {i} is blue.",
        "model_answer": "",
        "model_version": "v1",
    }


@pytest.fixture(scope="module")
def encoder(onnx_model_dir: Path) -> PromptEncoder:
    return PromptEncoder(onnx_model_dir)


@pytest.fixture(scope="module")
def eos_ids(onnx_model_dir: Path) -> tuple[int, ...]:
    return DecoderSpec.load(onnx_model_dir).eos_token_ids


def test_examples_are_the_serving_prompt_then_the_answer(encoder: PromptEncoder, eos_ids: Any) -> None:
    ex = example(3)
    (tok,), skipped = data.tokenize([ex], encoder, eos_ids, max_tokens=1024)
    assert skipped == []
    passages = [Passage(0, ex["passages"][0]), Passage(1, ex["passages"][1])]
    prompt = encoder.encode(build_messages("Widgets", passages, ex["question"]))
    assert tok.input_ids[: tok.prompt_len] == prompt
    answer = tok.input_ids[tok.prompt_len :]
    assert answer[-1] in eos_ids and not any(t in eos_ids for t in answer[:-1])
    assert encoder.decode(answer) == "Widget 3 is blue."


def test_too_long_examples_are_skipped_not_truncated(encoder: PromptEncoder, eos_ids: Any) -> None:
    tokens, skipped = data.tokenize([example(1), example(2, answer="word " * 300)], encoder, eos_ids, 200)
    assert [t.example_id for t in tokens] == ["c-1"]
    assert skipped == ["c-2"]


def write(root: Path, name: str, examples: list[dict[str, Any]]) -> datasets.Dataset:
    files, manifest = datasets.build(name, examples, created_at=0, reason="size")
    datasets.write(root, name, files, manifest)
    return datasets.load(root, name)


def test_replay_is_a_seeded_share_of_earlier_examples(tmp_path: Path) -> None:
    old = write(tmp_path, "ds-1", [example(i) for i in range(10)])
    # The new batch asks question 0 again: its newer answer wins, the old one is not replayed.
    new = write(tmp_path, "ds-2", [example(100, question="What colour is widget 0?"), example(101)])
    picked, sources = data.select_replay(new.examples, [old], fraction=2.0, max_examples=3, seed=7)
    again, _ = data.select_replay(new.examples, [old], fraction=2.0, max_examples=3, seed=7)
    assert picked == again and len(picked) == 3 and sources == ["ds-1"]
    assert "c-0" not in {e["id"] for e in picked}
    half, _ = data.select_replay(new.examples, [old], fraction=0.5, max_examples=64, seed=7)
    assert len(half) == 1
    assert data.select_replay(new.examples, [old], fraction=0.0, max_examples=64, seed=7) == ([], [])
    assert data.select_replay(new.examples, [], fraction=1.0, max_examples=64, seed=7) == ([], [])
    # The same feedback under other request ids replays the same examples.
    renamed = write(
        tmp_path,
        "ds-3",
        [{**e, "id": f"c-{99 - i}", "query_id": f"r{i}"} for i, e in enumerate(old.examples)],
    )
    replayed, _ = data.select_replay(new.examples, [renamed], fraction=2.0, max_examples=3, seed=7)
    assert sorted(e["question"] for e in replayed) == sorted(e["question"] for e in picked)


def test_unlearned_batches_are_carried_over_whole_newest_first(tmp_path: Path) -> None:
    first = write(tmp_path, "ds-1", [example(i) for i in range(4)])
    second = write(tmp_path, "ds-2", [example(10), example(11, question="What colour is widget 0?")])
    third = write(tmp_path, "ds-3", [example(20, question="What colour is widget 10?")])
    examples, sources = data.carry_over(third, [first, second], max_examples=100)
    assert sources == ["ds-3", "ds-2", "ds-1"]
    # Each question once, with its newest answer: widget 10's from ds-3, widget 0's from ds-2.
    assert [e["id"] for e in examples] == ["c-20", "c-11", "c-1", "c-2", "c-3"]
    # Only whole batches that fit: ds-2 adds one new question, ds-1 would add three more.
    examples, sources = data.carry_over(third, [first, second], max_examples=2)
    assert sources == ["ds-3", "ds-2"] and len(examples) == 2
    assert data.carry_over(third, [first, second], max_examples=0) == (list(third.examples), ["ds-3"])


def test_learned_datasets_follow_the_lineage_back_to_the_base(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"onnx")
    registry = ModelRegistry(tmp_path / "artifacts")
    base = registry.register(model, kind="base")
    v2 = registry.register(
        model,
        kind="candidate",
        metadata={"lineage": {"parent_version": base.version, "datasets": ["ds-2", "ds-1"]}},
    )
    # A candidate registered before `datasets` was recorded names only its own batch.
    v3 = registry.register(
        model, kind="candidate", metadata={"lineage": {"parent_version": v2.version, "dataset_id": "ds-3"}}
    )
    assert data.learned_datasets(registry, v3.version) == {"ds-1", "ds-2", "ds-3"}
    assert data.learned_datasets(registry, v2.version) == {"ds-1", "ds-2"}
    assert data.learned_datasets(registry, base.version) == set()
    assert data.learned_datasets(registry, "v99") == set()


def test_a_batch_left_empty_by_dropping_ungrounded_answers_fails_with_the_reason(
    tmp_path: Path, prepared_model: Path
) -> None:
    from flywheel_model.prepare import register_base
    from flywheel_trainer.job import run
    from flywheel_trainer.settings import HyperParameters, JobSettings

    root = tmp_path / "artifacts"
    base = register_base(prepared_model, root)
    # The passages say nothing of the corrected answer: retrieval missed it.
    write(root, "ds-1", [example(1, answer="It is sold only on Tuesdays in Oslo.")])
    settings = JobSettings(artifact_root=root, hyper=HyperParameters(ungrounded="drop"))
    with pytest.raises(RuntimeError, match=r"no example left to train on: all 1 .*ungrounded=drop"):
        run._gather(settings, run.JobArgs("ds-1", base, "job-1"), ModelRegistry(root))


def test_a_job_without_disk_for_its_candidate_fails_before_training(
    tmp_path: Path, prepared_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from flywheel_common.files import tree_bytes
    from flywheel_model.prepare import register_base
    from flywheel_trainer.job import run
    from flywheel_trainer.settings import JobSettings

    root = tmp_path / "artifacts"
    base = register_base(prepared_model, root)
    write(root, "ds-1", [example(1)])
    settings = JobSettings(artifact_root=root, scratch_dir=tmp_path / "scratch")
    parent = ModelRegistry(root).get(base)
    size = tree_bytes(parent.hf_dir) + tree_bytes(parent.model_dir)
    usage = shutil.disk_usage(tmp_path)
    # scratch and the store share one disk here: the job needs room for two copies.
    monkeypatch.setattr(run.shutil, "disk_usage", lambda _: usage._replace(free=2 * size - 1))
    with pytest.raises(RuntimeError, match=r"not enough disk for the candidate: .* needs about"):
        run.run(settings, run.JobArgs("ds-1", base, "job-1"))
    assert not (tmp_path / "scratch" / "job-1").exists()
    monkeypatch.setattr(run.shutil, "disk_usage", lambda _: usage._replace(free=2 * size))
    run._check_space(settings, parent)


def test_a_retried_job_whose_candidate_is_registered_writes_its_result_and_does_not_train(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flywheel_trainer.job import run
    from flywheel_trainer.results import read_result
    from flywheel_trainer.settings import JobSettings

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"onnx")
    root = tmp_path / "artifacts"
    registry = ModelRegistry(root)
    base = registry.register(model, kind="base").version
    lineage = {"job_id": "job-1", "parent_version": base, "dataset_id": "ds-1"}
    candidate = registry.register(
        model, kind="candidate", metadata={"lineage": lineage, "training": {"epoch_losses": [2.0, 1.5]}}
    ).version

    def no_training(*args: Any) -> None:
        raise AssertionError("trained again")

    monkeypatch.setattr(run, "_gather", no_training)
    result = run.run(JobSettings(artifact_root=root), run.JobArgs("ds-1", base, "job-1"))
    assert (result["status"], result["candidate_version"], result["base_version"]) == (
        "succeeded",
        candidate,
        base,
    )
    assert result["epoch_losses"] == [2.0, 1.5] and read_result(root, "job-1") == result
    assert [v.version for v in registry.list_versions()] == [base, candidate]
