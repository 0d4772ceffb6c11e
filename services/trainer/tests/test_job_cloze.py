"""Questions generated from the batch's passages: one span of a prose sentence, asked with "what",
checked before use, seeded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flywheel_common.registry import ModelRegistry
from flywheel_trainer.job import cloze

PASSAGES = [
    "The project was started in 1991 by Ada Lovelace Smith at the Harbour Institute. "
    "Releases are signed with the key_ring() helper before upload.",
    ">>> x = compute(3)\n>>> print(x)\nWhy is the sky blue? "
    "The widget repeats Widget and Widget again in this sentence.",
]


def example(
    i: int = 1, question: str = "who started the project?", passages: list[str] | None = None
) -> dict[str, Any]:
    return {
        "id": f"c-{i}",
        "source": "correction",
        "page_title": "About",
        "passages": PASSAGES if passages is None else passages,
        "question": question,
        "answer": "Ada Lovelace Smith",
    }


def test_a_prose_sentence_becomes_questions_about_its_spans() -> None:
    pairs = {g["question"]: g["answer"] for _, g in cloze.questions_from(example())}
    assert pairs["The project was started in what by Ada Lovelace Smith at the Harbour Institute?"] == "1991"
    assert pairs["The project was started in 1991 by what at the Harbour Institute?"] == "Ada Lovelace Smith"
    assert pairs["Releases are signed with the what helper before upload?"] == "key_ring()"
    for question, answer in pairs.items():
        assert answer not in question and "what" in question.lower()


def test_code_questions_and_repeated_names_are_not_asked_about() -> None:
    asked = [g for _, g in cloze.questions_from(example())]
    assert not any("compute" in g["question"] or "sky" in g["question"] for g in asked)
    # "Widget" is said twice in the context: an answer the context repeats is ambiguous.
    assert not any(g["answer"] == "Widget" for g in asked)


def test_generated_examples_keep_the_interactions_prompt() -> None:
    (first, *_) = cloze.generate([example()], count=10, seed=1)
    assert first["passages"] == PASSAGES and first["page_title"] == "About"
    assert first["source"] == "generated" and first["id"].startswith("gen-")


def test_generation_is_seeded_capped_one_per_sentence_and_never_repeats_a_visitors_question() -> None:
    examples = [
        example(1),
        example(2, question="The project was started in 1991 by what at the Harbour Institute?"),
    ]
    out = cloze.generate(examples, count=10, seed=7)
    assert out == cloze.generate(examples, count=10, seed=7)
    # Two prose sentences: one question from each.
    assert len(out) == 2
    assert all(g["question"] != examples[1]["question"] for g in out)
    assert len(cloze.generate(examples, count=1, seed=7)) == 1
    assert cloze.generate(examples, count=0, seed=7) == []


def test_the_job_trains_on_generated_questions_when_asked_to(tmp_path: Path, prepared_model: Path) -> None:
    from flywheel_model.prepare import register_base
    from flywheel_trainer import datasets
    from flywheel_trainer.job import run
    from flywheel_trainer.settings import HyperParameters, JobSettings

    root = tmp_path / "artifacts"
    base = register_base(prepared_model, root)
    batch = [example(i, passages=[PASSAGES[0].replace("1991", str(1990 + i))]) for i in range(3)]
    files, manifest = datasets.build("ds-1", batch, created_at=0, reason="size")
    datasets.write(root, "ds-1", files, manifest)
    registry = ModelRegistry(root)
    plain = run._gather(JobSettings(artifact_root=root), run.JobArgs("ds-1", base, "job-1"), registry)
    hyper = HyperParameters(generated_per_example=1.0)
    more = run._gather(
        JobSettings(artifact_root=root, hyper=hyper), run.JobArgs("ds-1", base, "job-2"), registry
    )
    assert plain.generated == 0 and more.generated == 3
    generated = [e for e in more.examples if e.example_id.startswith("gen-")]
    assert len(generated) == 3 and len(more.examples) == len(plain.examples) + 3
