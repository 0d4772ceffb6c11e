"""Questions generated from the passages visitors were shown, to teach reading between rounds.

A round brings a few dozen corrections; the passages the model was given for them hold many more
facts. Each sentence of those passages can become a question about one of its spans (a name, a
number, an identifier): the span is replaced by "what" and the sentence becomes the question
("Python was created by Guido van Rossum." -> "Python was created by what?", answer "Guido van
Rossum"). The example keeps the interaction's own prompt (page title and passages), so the model is
asked exactly as a visitor's question is asked, and learns to find the sentence a question is about
and copy the part it asks for: the skill a paraphrased question needs too, though these questions
share the page's words. Nothing here is specific to a site or a language beyond English's wh-word.

Checked before use: the sentence is prose (not code or a listing), the span is short, grounded in the
passages (job/targets.py) and said there only once, the question does not already contain the
answer, and no question is asked twice (nor one a visitor asked).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Sequence
from typing import Any

from flywheel_eval.metrics import normalize_answer
from flywheel_trainer.job.targets import grounded_span

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
# Spans worth asking about, most specific first: identifiers and options, numbers, capitalized names
# (runs of capitalized words, with the particles names carry).
_IDENTIFIER = re.compile(
    r"(?<![\w.$-])(?:--?[a-z][\w-]*|\$\w+|[A-Za-z_]\w+(?:\.[A-Za-z_]\w+)+(?:\(\))?|\w*_\w*(?:\(\))?|\w+\(\))(?![\w$-])"
)
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?![\w])")
_NAME = re.compile(
    r"(?<![\w.])[A-Z][\w+-]*(?:\s+(?:(?:of|van|von|de|for)\s+)?(?:[A-Z][\w+-]*|\d+))*(?![/\w])"
)
MIN_SENTENCE_WORDS, MAX_SENTENCE_WORDS = 6, 40
MAX_SPAN_WORDS = 6
# Share of a sentence's characters that are letters or spaces: below it, code or a listing.
MIN_PROSE_SHARE = 0.85
_CODE = (">>>", "=", "{", "[", ";")
# Questions must keep this many content words beyond the span's, or they ask nothing.
MIN_QUESTION_WORDS = 4


def sentences(passage: str) -> list[str]:
    """The passage's sentences, whitespace flattened."""
    return [s.strip() for s in _SENTENCE.split(" ".join(passage.split())) if s.strip()]


def _is_prose(sentence: str) -> bool:
    """A whole sentence of prose: starts with a capital, ends with a full stop, is not code or a
    listing, and is neither too short to ask about nor too long to be one fact."""
    words = sentence.split()
    if not MIN_SENTENCE_WORDS <= len(words) <= MAX_SENTENCE_WORDS:
        return False
    if not (sentence[0].isupper() and sentence.endswith(".")) or any(c in sentence for c in _CODE):
        return False
    plain = sum(c.isalpha() or c.isspace() for c in sentence)
    return plain >= MIN_PROSE_SHARE * len(sentence)


def _spans(sentence: str) -> list[str]:
    """The sentence's candidate spans, most specific first; a capitalized first word is not a name."""
    out: list[tuple[int, int]] = []
    for pattern in (_IDENTIFIER, _NUMBER, _NAME):
        for match in pattern.finditer(sentence):
            text = match.group().rstrip(".,;:")
            start, end = match.start(), match.start() + len(text)
            if pattern is _NAME and start == 0:
                continue
            if len(text) < 2 or len(text.split()) > MAX_SPAN_WORDS:
                continue
            if any(start < e and s < end for s, e in out):
                continue
            out.append((start, end))
    return [sentence[s:e] for s, e in out]


def _question(sentence: str, span: str) -> str:
    start = sentence.index(span)
    before, after = sentence[:start], sentence[start + len(span) :]
    return f"{before}{'what' if before else 'What'}{after}".rstrip(" .!?:;,") + "?"


def _content(text: str) -> set[str]:
    return {w for w in normalize_answer(text).split() if len(w) > 2}


def questions_from(example: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every checked question one example's passages give, with its sentence: the example's prompt
    (page title, passages) and a new question and answer."""
    passages: Sequence[str] = example.get("passages") or []
    # An answer said more than once in the context (a name the page repeats) is ambiguous.
    context = " ".join(" ".join(passages).split())
    out = []
    for passage in passages:
        for sentence in sentences(passage):
            if not _is_prose(sentence):
                continue
            for span in _spans(sentence):
                question = _question(sentence, span)
                if _content(span) & _content(question) or len(_content(question)) < MIN_QUESTION_WORDS:
                    continue
                if context.count(span) != 1 or grounded_span(span, passages, question) is None:
                    continue
                generated = {
                    "page_title": example.get("page_title", ""),
                    "passages": list(passages),
                    "question": question,
                    "answer": span,
                    "source": "generated",
                }
                out.append((sentence, generated))
    return out


def generate(examples: Iterable[dict[str, Any]], *, count: int, seed: int) -> list[dict[str, Any]]:
    """Up to `count` generated examples from the examples' passages, one per sentence at most, drawn
    with `seed`; none asks a question an example asks."""
    if count <= 0:
        return []
    examples = list(examples)
    asked = {normalize_answer(e["question"]) for e in examples}
    by_sentence: dict[str, list[dict[str, Any]]] = {}
    for example in examples:
        for sentence, generated in questions_from(example):
            key = normalize_answer(generated["question"])
            if key not in asked:
                asked.add(key)
                by_sentence.setdefault(sentence, []).append(generated)
    rng = random.Random(seed)
    picked = [rng.choice(group) for _, group in sorted(by_sentence.items())]
    rng.shuffle(picked)
    out = []
    for generated in picked[:count]:
        digest = hashlib.sha256(f"{generated['question']}\0{generated['answer']}".encode()).hexdigest()
        out.append({"id": f"gen-{digest[:16]}", **generated})
    return out
