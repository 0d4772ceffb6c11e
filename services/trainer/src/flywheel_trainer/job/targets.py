"""Training targets: an answer is taught as the span of the page it quotes, and little else.

A correction is written by a person ("It was Ada Lovelace, at the lab."), and an answer that visitors
rated high is the model's own sentence. What a reader of the page should learn to say is the part of
it that the page itself says: the longest run of the answer's words found in the passages the model
was given, trimmed of function words and of words the question already has. An answer whose content
the passages do not hold (retrieval missed it) is *ungrounded*: training on it teaches the model to
answer from memory, which does not carry over to other questions. Such an answer is kept as written,
left out, or (for a correction) taught as the abstention: the model saw passages without the answer,
so for that prompt the right output is "The page does not say."
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from bm25s.stopwords import STOPWORDS_EN

from flywheel_eval.metrics import normalize_answer
from flywheel_model.prompt import NO_ANSWER

_STOP = frozenset(STOPWORDS_EN) | {
    "",
    "i",
    "you",
    "we",
    "they",
    "he",
    "she",
    "its",
    "so",
    "do",
    "does",
    "did",
    # A correction's preamble ("The answer is ..."): a heading "Answer" on the page grounds nothing.
    "answer",
}
# Punctuation an answer does not end or start with; a bracket only where the span does not close it
# ("os.path.join()" keeps its brackets, "(at the lab" loses its opening one).
_TRAILING = ".,;:!?\"'\u201d\u2019"
_LEADING = "\"'\u201c\u2018"
# What may stand between a span's words, besides the answer's own symbols: ordinary sentence
# punctuation and articles. Words are matched after normalisation, which drops tokens made only of
# symbols ("<<<>>>", "$$$", "the|a|an"), so the page's text between them is checked before it is quoted.
_ORDINARY_PUNCTUATION = frozenset(",.;:!?'\"()-\u2013\u2014\u2018\u2019\u201c\u201d")
_ARTICLES = frozenset({"a", "an", "the"})
# Share of the answer's content words (not function words, not the question's words) that the span
# must hold more than for the answer to count as grounded.
MIN_COVERAGE = 0.5

TargetMode = Literal["as_written", "grounded_span"]
UngroundedMode = Literal["keep", "drop", "abstain"]


@dataclass(frozen=True)
class _Word:
    norm: str
    start: int
    end: int


def _words(text: str) -> list[_Word]:
    out = []
    position = 0
    for raw in text.split():
        start = text.index(raw, position)
        position = start + len(raw)
        out.append(_Word(normalize_answer(raw), start, position))
    return [w for w in out if w.norm]


def grounded_span(answer: str, passages: Sequence[str], question: str = "") -> str | None:
    """The passage text that grounds `answer` (quoted as the passage has it), or None when the passages
    do not hold most of its content.

    Where the passage puts anything but ordinary punctuation, articles or symbols the answer has too
    between the span's words ("Ada <<<>>> $$$ Lovelace"), the answer is grounded but not quoted: it
    is returned as written, so a page cannot put its own text into a target.
    """
    asked = {token for token in normalize_answer(question).split()}
    said = _words(answer)
    content = [w.norm not in _STOP and not set(w.norm.split()) <= asked for w in said]
    needed = sum(content)
    if not needed:
        return None
    prefix = [0]
    for flag in content:
        prefix.append(prefix[-1] + flag)
    best: tuple[int, int] | None = None  # (score, length): most content, then the answer's longest run
    found: tuple[str, list[_Word], int, int] | None = None  # (passage, its words, first, last word)
    for passage in passages:
        words = _words(passage)
        previous = [0] * (len(said) + 1)
        for j, word in enumerate(words):
            current = [0] * (len(said) + 1)
            for i, spoken in enumerate(said):
                if spoken.norm == word.norm:
                    run = previous[i] + 1
                    current[i + 1] = run
                    key = (prefix[i + 1] - prefix[i + 1 - run], run)
                    if best is None or key > best:
                        best, found = key, (passage, words, j - run + 1, j)
            previous = current
    if best is None or found is None or best[0] <= MIN_COVERAGE * needed:
        return None
    passage, words, first, last = found
    # Function words at either end are not part of the answer, nor are the question's own words,
    # unless the answer would be one word without them: in "the threading module" (asked "threading
    # or _thread?") or "PEP 602" (asked "which pep") they are what tells the answer apart.
    first, last = _trim(words, first, last, lambda norm: norm in _STOP)
    short = _trim(words, first, last, lambda norm: norm in _STOP or set(norm.split()) <= asked)
    if short[1] > short[0]:
        first, last = short
    own = set(answer.split())
    between = (passage[words[k].end : words[k + 1].start].split() for k in range(first, last))
    if any(not _ordinary(token) and token not in own for gap in between for token in gap):
        return answer.strip()
    # One line: the passage's line breaks would end the answer early where the prompt's answer ends
    # with its line (prompt.PLAIN_TEMPLATE).
    return _strip_edges(" ".join(passage[words[first].start : words[last].end].split())) or None


def _ordinary(token: str) -> bool:
    """Whether a token between a span's words is sentence punctuation or an article."""
    bare = "".join(char for char in token if char not in _ORDINARY_PUNCTUATION)
    return not bare or bare.lower() in _ARTICLES


def _trim(words: Sequence[_Word], first: int, last: int, drop: Callable[[str], bool]) -> tuple[int, int]:
    while first < last and drop(words[first].norm):
        first += 1
    while last > first and drop(words[last].norm):
        last -= 1
    return first, last


def _strip_edges(text: str) -> str:
    """Punctuation off both ends, a bracket the span does not also open or close, and brackets
    around the whole span."""
    while text:
        if text[-1] in _TRAILING or (text[-1] == ")" and text.count(")") > text.count("(")):
            text = text[:-1]
        elif text[0] in _LEADING or (text[0] == "(" and text.count("(") > text.count(")")):
            text = text[1:]
        elif text[0] == "(" and text[-1] == ")" and text.count("(") == text.count(")"):
            text = text[1:-1]  # a parenthesis around the whole answer: "(PEP 602)"
        else:
            return text
    return text


@dataclass
class TargetStats:
    """How the examples' targets were shaped, for the candidate's lineage."""

    grounded: int = 0
    ungrounded: int = 0
    dropped: int = 0
    shortened: int = 0
    abstained: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "grounded": self.grounded,
            "ungrounded": self.ungrounded,
            "dropped": self.dropped,
            "shortened": self.shortened,
            "abstained": self.abstained,
        }


def shape_targets(
    examples: Iterable[dict[str, Any]], target: TargetMode, ungrounded: UngroundedMode
) -> tuple[list[dict[str, Any]], TargetStats]:
    """The examples with their answers as spans of their passages (`grounded_span`) or as written;
    ungrounded ones kept, dropped, or (`abstain`) corrections and abstentions taught as NO_ANSWER, the
    rest dropped."""
    out: list[dict[str, Any]] = []
    stats = TargetStats()
    for example in examples:
        span = grounded_span(example["answer"], example.get("passages") or [], example["question"])
        if span is None:
            stats.ungrounded += 1
            abstains = normalize_answer(example["answer"]) == normalize_answer(NO_ANSWER)
            if ungrounded == "abstain" and (example.get("source") == "correction" or abstains):
                stats.abstained += 1
                out.append({**example, "answer": NO_ANSWER, "written_answer": example["answer"]})
            elif ungrounded == "keep":
                out.append(example)
            else:
                # A positive is a visitor's approval of the answer: taught as an abstention it would
                # contradict them (unless it abstained), and as written it teaches answering from memory.
                stats.dropped += 1
            continue
        stats.grounded += 1
        if target == "grounded_span" and span != example["answer"].strip():
            stats.shortened += 1
            out.append({**example, "answer": span, "written_answer": example["answer"]})
        else:
            out.append(example)
    return out, stats
