"""Choosing among candidate answers by the sentence the passages say them in."""

from __future__ import annotations

from flywheel_model.candidates import Passages, choose, continues, nearness

PASSAGES = Passages.of(
    [
        "The first patches that removed the global lock came from Greg Stein for release 1.5. "
        "Adam Olsen later wrote another attempt.",
        "Tools: the manual is built with Sphinx; its sources are written in reStructuredText.",
    ]
)


def test_the_answer_said_among_the_questions_words_wins_over_a_likelier_one() -> None:
    question = "Who wrote the patches that removed the global lock in 1.5?"
    assert nearness(question, "Greg Stein", PASSAGES) > nearness(question, "Adam Olsen", PASSAGES) > 0
    assert choose(question, PASSAGES, ["Adam Olsen", "Greg Stein", "Guido"]) == 1
    question = "What tool builds the manual?"
    assert choose(question, PASSAGES, ["reStructuredText", "Sphinx"]) == 1


def test_the_model_order_stands_on_a_tie_and_where_no_sentence_says_an_answer() -> None:
    question = "Which tools are named?"
    # Both in the same sentence: the same share of the question's words, so the likelier stays.
    assert choose(question, PASSAGES, ["reStructuredText", "Sphinx"]) == 0
    # A part of the likelier answer, said in its sentence, is no nearer for leaving out a word the
    # question asks with: the whole sentence counts.
    passages = Passages.of(["A non-blocking connect sets errno.EINPROGRESS while it is in progress."])
    question = "Which errno says a non-blocking connect is still in progress?"
    assert nearness(question, "EINPROGRESS", passages) == nearness(question, "errno.EINPROGRESS", passages)
    assert choose(question, passages, ["errno.EINPROGRESS", "EINPROGRESS"]) == 0
    # Not said word for word in any passage: 0, the same as said among none of the question's words.
    assert nearness("Who wrote the patches?", "Stein Greg", PASSAGES) == 0.0
    assert choose("Who wrote the patches?", PASSAGES, ["Someone else", "Nobody"]) == 0
    # A question of function words only matches nothing.
    assert choose("Is it that?", PASSAGES, ["Greg Stein", "Sphinx"]) == 0


def test_an_empty_answer_loses_to_any_other_and_one_answer_is_given_as_it_is() -> None:
    question = "Who wrote the patches?"
    assert choose(question, PASSAGES, ["", "Someone else"]) == 1
    assert choose(question, PASSAGES, ["", ""]) == 0
    assert choose(question, PASSAGES, ["Adam Olsen"]) == 0
    # Sentences end at their punctuation: Adam Olsen's sentence does not hold "patches" or "1.5".
    assert nearness("Which patches were for 1.5?", "Adam Olsen", PASSAGES) == 0.0
    # Case and punctuation aside, words match whole: "Stein" is not "Steinway".
    assert nearness("Who wrote the patches?", "greg stein", PASSAGES) > 0
    assert nearness("Who wrote the patches?", "Stein", Passages.of(["Steinway wrote the patches."])) == 0.0


def test_a_candidate_continues_while_a_passage_says_its_words_in_a_row() -> None:
    assert continues("", PASSAGES) and continues("Greg St", PASSAGES)
    assert continues("greg stein for release", PASSAGES)
    assert not continues("Greg Olsen", PASSAGES)
    assert not continues("reg Stein", PASSAGES)  # words start where the passage's do
