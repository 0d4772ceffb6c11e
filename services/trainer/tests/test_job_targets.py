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


def test_a_span_keeps_its_brackets_and_loses_those_it_does_not_close() -> None:
    passages = ["For a deep copy use copy.deepcopy() (PEP 602). Guido (at CWI wrote it."]
    deep = "The answer is copy.deepcopy()."
    assert grounded_span(deep, passages, "how do i deep copy") == "copy.deepcopy()"
    assert grounded_span("PEP 602.", passages, "which document") == "PEP 602"
    assert grounded_span("The answer is at CWI", passages, "where did guido write it") == "CWI"


def test_a_span_is_one_line() -> None:
    # Where the answer ends with its line, a line break taught inside it would cut it short.
    passages = ["Default values are created exactly once, when\nthe function is defined."]
    asked = "why does my default dict keep its values"
    assert grounded_span("They are created exactly once, when the function is defined.", passages, asked) == (
        "created exactly once, when the function is defined"
    )


def test_a_corrections_preamble_is_not_grounded_by_a_heading() -> None:
    passages = ["Answer\nThe exception syntax comes from Modula-3."]
    assert grounded_span("The answer is Smalltalk.", passages, "which language") is None


def test_the_questions_words_stay_where_the_answer_would_be_one_word_without_them() -> None:
    passages = ["Use the threading module; _thread is low-level. PEP 602 sets the release schedule."]
    asked = "should i use threading or _thread"
    assert grounded_span("The answer is the threading module.", passages, asked) == "threading module"
    assert grounded_span("The answer is PEP 602.", passages, "which pep set the schedule") == "PEP 602"
    # With more than one word left, the question's words at the ends go as before.
    wrote = ["Guido van Rossum wrote Python at CWI."]
    assert grounded_span("Guido van Rossum wrote Python.", wrote, "who wrote python") == "Guido van Rossum"


def test_a_span_with_the_pages_symbols_between_its_words_is_taught_as_written() -> None:
    # Words match after normalisation, which drops tokens of symbols only: quoted, the span would
    # carry the page's junk into an expert's target.
    junk = [
        "Python was created by Guido <<<>>> van $$$ ``` Rossum the|a|an at \u2620\u2620\u2620 CWI in 1989."
    ]
    wrote = "It was Guido van Rossum, at CWI."
    assert grounded_span(wrote, junk, "Who created Python?") == wrote
    shaped, stats = shape_targets(
        [
            {
                "id": "c1",
                "source": "correction",
                "question": "Who created Python?",
                "answer": wrote,
                "passages": junk,
            }
        ],
        "grounded_span",
        "drop",
    )
    assert [e["answer"] for e in shaped] == [wrote] and stats.grounded == 1 and stats.shortened == 0
    # Ordinary punctuation and articles between the words are quoted as before, and so are symbols
    # the answer has too.
    plain = ["It was created by Guido -- van Rossum (the BDFL), at CWI; in 1989."]
    assert (
        grounded_span("Guido van Rossum, the BDFL, at CWI", plain, "who")
        == "Guido -- van Rossum (the BDFL), at CWI"
    )
    code = ["Write x = 1 + y to add them."]
    assert grounded_span("It is x = 1 + y", code, "how do i add") == "x = 1 + y"
    assert grounded_span("It is x 1 y", code, "how do i add") == "It is x 1 y"
