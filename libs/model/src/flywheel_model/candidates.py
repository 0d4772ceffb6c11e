"""Choosing among a question's candidate answers by where the passages say them.

A small model reading a page often knows the kind of answer and picks the wrong instance of it: the
passages name two people, two tools, two suffixes, and the likeliest is not the one the question is
about. Its next few candidates (the other likeliest first tokens, each continued greedily) often
hold the right one. A passage says the right one in a sentence with the question's own words, so
each candidate a passage's sentence holds word for word is scored by the share of the question's
content words in that sentence, and the best score wins: the question points to a sentence, and
within a sentence the model's order stands. Ties, and candidates no sentence holds, keep the
model's order: the greedy answer stands unless another is said in a sentence with more of the
question's words. So a candidate other than the greedy one can only win where a passage says it,
and it is stopped as soon as no passage says what it has so far (`continues`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from bm25s.stopwords import STOPWORDS_EN

# Words compared by their first letters, so that "installing" meets "install" without a stemmer.
PREFIX = 5

# Function words: they are in every sentence.
_STOP = frozenset(STOPWORDS_EN)
_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Passages:
    """A request's passages split into words once (a candidate is checked against them every step):
    each passage as one run of words, and each of its sentences."""

    runs: tuple[str, ...]
    sentences: tuple[tuple[str, ...], ...]

    @classmethod
    def of(cls, passages: Sequence[str]) -> Passages:
        return cls(
            tuple(" " + " ".join(words(passage)) for passage in passages),
            tuple(tuple(words(s)) for passage in passages for s in _SENTENCE_END.split(passage)),
        )


def nearness(question: str, answer: str, passages: Passages) -> float:
    """The largest share of the question's content words in a passage sentence that says `answer`
    word for word; 0 when no sentence says it. The whole sentence counts, the answer's own words
    too, so two candidates of one sentence score the same."""
    asked = {w[:PREFIX] for w in words(question) if w not in _STOP}
    said = tuple(words(answer))
    if not asked or not said:
        return 0.0
    best = 0.0
    for text in passages.sentences:
        if any(text[start : start + len(said)] == said for start in range(len(text) - len(said) + 1)):
            best = max(best, len(asked & {w[:PREFIX] for w in text}) / len(asked))
    return best


def continues(answer: str, passages: Passages) -> bool:
    """Whether a passage says `answer` so far: its words in a row, the last one possibly cut short."""
    said = " " + " ".join(words(answer))
    return any(said in run for run in passages.runs)


def choose(question: str, passages: Passages, answers: Sequence[str]) -> int:
    """The index of the answer to give among `answers` (the model's order, likeliest first): the
    non-empty one said among the most of the question's words, the earliest on a tie."""
    scores = [nearness(question, answer, passages) if answer.strip() else -1.0 for answer in answers]
    return max(range(len(answers)), key=lambda i: (scores[i], -i)) if answers else 0
