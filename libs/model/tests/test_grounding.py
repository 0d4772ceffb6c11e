"""Grounded decoding: answers are copied from the passages, on a toy vocabulary and on the real model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flywheel_eval.metrics import normalize_answer
from flywheel_model.engine import AnswerEngine, EngineSettings
from flywheel_model.generation import SamplingParams
from flywheel_model.grounding import GroundedChooser, Vocabulary
from flywheel_model.prompt import NO_ANSWER
from flywheel_model.runtime import OrtSettings

EOS = 0
TEXTS = ["<eos>", "The", " lamp", " is", " blue", " red", "Blue", " lam", "p", " The"]
TEXTS += [" page", " does", " not", " say", "."]


def _logits(*ranked: str) -> np.ndarray:
    """Logits that rank the given token texts first, in order, and every other token below them."""
    logits = np.zeros(len(TEXTS))
    for rank, text in enumerate(ranked):
        logits[TEXTS.index(text)] = 10.0 - rank
    return logits


def _choose(chooser: GroundedChooser, *ranked: str) -> str:
    return TEXTS[chooser(_logits(*ranked))]


def _chooser(*sources: str) -> GroundedChooser:
    return GroundedChooser(Vocabulary(TEXTS, [EOS]), sources, top_k=4)


def test_the_likeliest_token_that_stays_in_the_passage_is_taken() -> None:
    chooser = _chooser("The lamp is blue.")
    # "red" is likelier but the passage never says it.
    assert [_choose(chooser, t) for t in ("The", " lamp", " is")] == ["The", " lamp", " is"]
    assert _choose(chooser, " red", " blue") == " blue"
    assert _choose(chooser, "<eos>") == "<eos>"


def test_case_and_spacing_do_not_matter_and_stops_fall_on_word_ends() -> None:
    chooser = _chooser("the   lamp\nis BLUE")
    assert _choose(chooser, "Blue") == "Blue"
    chooser = _chooser("The lamp is blue.")
    assert _choose(chooser, " lam") == " lam"
    # Stopping inside "lamp" is refused; the next grounded token is taken instead.
    assert _choose(chooser, "<eos>", "p") == "p"
    assert _choose(chooser, "<eos>") == "<eos>"


def test_an_answer_starts_where_a_word_of_the_passage_starts() -> None:
    chooser = _chooser("The lamp is blue.")
    assert _choose(chooser, "p", " lamp") == " lamp"  # "p" occurs only inside "lamp"


def test_no_span_crosses_from_one_passage_into_the_next() -> None:
    chooser = _chooser("The lamp", "is blue")
    assert _choose(chooser, "The") == "The" and _choose(chooser, " lamp") == " lamp"
    # " is" would join the two passages: nothing grounded is left, so the answer ends.
    assert _choose(chooser, " is") == "<eos>"


def test_the_no_answer_sentence_is_grounded_when_offered() -> None:
    chooser = _chooser("The lamp is blue.", NO_ANSWER)
    words = [_choose(chooser, t) for t in ("The", " page", " does", " not", " say", ".", "<eos>")]
    assert "".join(words[:-1]) == NO_ANSWER and words[-1] == "<eos>"


def test_when_nothing_grounded_is_likely_the_answer_is_free() -> None:
    chooser = _chooser("The lamp is blue.")
    assert _choose(chooser, " red", " page", " does", " not") == " red"  # none of the top 4 is grounded
    assert _choose(chooser, " say", " blue") == " say"  # and it stays free to the end


@pytest.mark.integration
def test_grounded_answers_of_the_real_model_are_spans_of_its_passages(onnx_model_dir: Path) -> None:
    page = (
        "The observatory opened in 1894 on the northern ridge. "
        "Its main telescope has a mirror of 1.2 metres. "
        "Visitors may tour the dome on Saturdays between ten and four. Tickets cost eight euros for adults."
    )
    questions = ["When did the observatory open?", "How big is its mirror?", "When can visitors tour?"]
    engine = AnswerEngine(onnx_model_dir, OrtSettings(), EngineSettings(decoding="grounded", max_batch=4))
    try:
        for question in questions:
            result = engine.answer(page, "The observatory", question, SamplingParams(max_new_tokens=24))
            sources = [normalize_answer(p.text) for p in result.passages] + [normalize_answer(NO_ANSWER)]
            answer = normalize_answer(result.text)
            assert answer and any(answer in source for source in sources), (question, result.text)
    finally:
        engine.close()
