"""Training targets: answers taught as the passage span they quote; ungrounded ones kept, dropped or
abstained."""

from __future__ import annotations

from flywheel_model.prompt import NO_ANSWER
from flywheel_trainer.job.data import preference_pair
from flywheel_trainer.job.targets import grounded_span, shape_targets

PASSAGES = [
    "Python's syntax was influenced by ABC. The exception syntax comes from Modula-3, as do classes.",
    "Guido van Rossum started writing Python at CWI in 1989.",
]


def test_a_sentence_around_the_answer_becomes_the_span_the_page_has() -> None:
    asked = "where does python's exception syntax come from"
    assert grounded_span("The answer is Modula-3.", PASSAGES, asked) == "Modula-3"
    assert grounded_span("It is 1989", PASSAGES, "what year did guido start python") == "1989"
    created = "It was created by Guido van Rossum at CWI in the Netherlands"
    assert grounded_span(created, PASSAGES, "who created python") == "Guido van Rossum"


def test_words_of_the_question_do_not_ground_an_answer() -> None:
    # "exception syntax" is on the page, but it is what was asked, not the answer.
    asked = "where does the exception syntax come from"
    assert grounded_span("The exception syntax is from Smalltalk", PASSAGES, asked) is None


def test_an_answer_the_passages_do_not_hold_is_ungrounded() -> None:
    assert grounded_span("The answer is Smalltalk.", PASSAGES, "which language") is None
    assert grounded_span("", PASSAGES, "anything") is None
    assert grounded_span("Modula-3", [], "anything") is None


def example(i: int, answer: str, **extra: object) -> dict[str, object]:
    return {"id": f"e{i}", "question": "which language gave the exception syntax", "answer": answer,
            "passages": PASSAGES, "source": "correction", **extra}  # fmt: skip


def test_shape_targets_modes() -> None:
    examples = [example(1, "The answer is Modula-3."), example(2, "The answer is Smalltalk.")]
    spans, stats = shape_targets(examples, "grounded_span", "keep")
    assert [e["answer"] for e in spans] == ["Modula-3", "The answer is Smalltalk."]
    assert spans[0]["written_answer"] == "The answer is Modula-3."
    assert stats.as_dict() == {"grounded": 1, "ungrounded": 1, "dropped": 0, "shortened": 1, "abstained": 0}
    written, _ = shape_targets(examples, "as_written", "drop")
    assert [e["answer"] for e in written] == ["The answer is Modula-3."]
    assert examples[0]["answer"] == "The answer is Modula-3."  # the inputs are not changed


def test_abstain_teaches_an_ungrounded_correction_to_say_the_page_does_not_say() -> None:
    examples = [
        example(1, "The answer is Modula-3."),
        example(2, "The answer is Smalltalk."),
        example(3, "Smalltalk, mostly.", source="positive"),
        example(4, NO_ANSWER.lower(), source="positive"),
    ]
    shaped, stats = shape_targets(examples, "grounded_span", "abstain")
    # The grounded correction is unchanged by the mode; the ungrounded one abstains, as does the
    # approved abstention; the ungrounded positive is neither taught from memory nor turned around.
    taught = [(e["id"], e["answer"]) for e in shaped]
    assert taught == [("e1", "Modula-3"), ("e2", NO_ANSWER), ("e4", NO_ANSWER)]
    assert shaped[1]["written_answer"] == "The answer is Smalltalk."
    assert stats.as_dict() == {"grounded": 1, "ungrounded": 3, "dropped": 1, "shortened": 1, "abstained": 2}
    assert examples[1]["answer"] == "The answer is Smalltalk."
    # The same grounding test as `drop`: what drop leaves out, abstain turns into abstentions.
    dropped, _ = shape_targets(examples, "grounded_span", "drop")
    assert {e["id"] for e in shaped} - {e["id"] for e in dropped} == {"e2", "e4"}
    # An abstention target prefers itself over the answer the model made up instead.
    assert preference_pair(shaped[1] | {"model_answer": "From Smalltalk."}) == "From Smalltalk."


def test_a_correction_prefers_its_target_over_the_answer_it_replaced() -> None:
    assert preference_pair(example(1, "Modula-3", model_answer="It comes from C.")) == "It comes from C."
    # An answer that already held the correction, a missing one, or a positive give no pair.
    assert preference_pair(example(2, "Modula-3", model_answer="From Modula-3, of course.")) is None
    assert preference_pair(example(3, "Modula-3", model_answer="")) is None
    assert preference_pair(example(4, "Modula-3", model_answer="C", source="positive")) is None
