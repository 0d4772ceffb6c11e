"""Retrieval: a page is reduced to clean text, split into passages, and the passages most relevant
to the question (BM25) are chosen to fit a token budget. Passages are cached by content hash."""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import bm25s
import numpy as np
from selectolax.lexbor import LexborHTMLParser

from flywheel_common.text import clean_text

_DROP = "script, style, noscript, template, svg, nav, header, footer, aside, form, iframe, button"
_BLOCKS = (
    "p, div, li, dt, dd, h1, h2, h3, h4, h5, h6, pre, blockquote, tr, section, article, br, hr, "
    "table, ul, ol, dl"
)
_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")
_WHITESPACE = re.compile(r"\s+")
# Where html_to_text ends a line (a private-use character, taken out of the page first).
_LINE_END = "\ue000"
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
# Characters a token may stand for, at most, when a passage over the budget is cut: longer than any
# token of the vocabularies served (SmolLM2's longest is 81, a run of "#"; Gemma 3's 31). It bounds
# the prefixes tried, so cutting a 2 MB word costs a few short tokenizations, not 2 MB ones.
_MAX_TOKEN_CHARS = 128


class PageNotIndexable(ValueError):
    """The page's text cannot be indexed for retrieval: the request's to change, not the server's."""


def html_to_text(html: str) -> tuple[str, str]:
    """Clean text of an HTML page (one block per line) and its title.

    Whitespace is read as a browser renders it (and as a page's `innerText`, which the widget sends,
    has it): a line break in the HTML source is a space, except in preformatted text; blocks and
    `<br>` end lines. A paragraph's source wrapping would otherwise break its sentences, and an
    answer copied from it, into lines.
    """
    tree = LexborHTMLParser(html.replace(_LINE_END, ""))
    title_node = tree.css_first("title")
    title = title_node.text(strip=True) if title_node else ""
    for node in tree.css(_DROP):
        node.decompose()
    for node in tree.css("pre"):
        lines = node.text(separator="").replace("\n", _LINE_END)
        node.replace_with(f"{_LINE_END}{lines}{_LINE_END}")
    for node in tree.css(_BLOCKS):
        node.insert_after(_LINE_END)
    root = tree.body or tree.root
    raw = root.text(separator="") if root else ""
    return normalise_text(_WHITESPACE.sub(" ", raw).replace(_LINE_END, "\n")), title


def normalise_text(text: str) -> str:
    """Drops control, escape and bidi characters, collapses runs of spaces and drops empty lines."""
    lines = (_SPACES.sub(" ", line).strip() for line in clean_text(text).split("\n"))
    return "\n".join(line for line in lines if line)


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Passage:
    """A contiguous piece of the page; `index` is its position in the page."""

    index: int
    text: str
    score: float = 0.0


def split_passages(text: str, *, max_words: int = 80) -> list[str]:
    """Groups lines into passages of at most `max_words` words; long lines split on sentences."""
    units: list[str] = []
    for line in text.splitlines():
        if len(line.split()) <= max_words:
            units.append(line)
            continue
        words_so_far: list[str] = []
        for sentence in _SENTENCE.split(line):
            if words_so_far and len(" ".join([*words_so_far, sentence]).split()) > max_words:
                units.append(" ".join(words_so_far))
                words_so_far = []
            words_so_far.append(sentence)
        if words_so_far:
            units.append(" ".join(words_so_far))
    passages: list[str] = []
    current: list[str] = []
    count = 0
    for unit in units:
        n = len(unit.split())
        if current and count + n > max_words:
            passages.append("\n".join(current))
            current, count = [], 0
        current.append(unit)
        count += n
    if current:
        passages.append("\n".join(current))
    return passages


class _Index:
    def __init__(self, passages: list[str], count_tokens: Callable[[str], int]) -> None:
        self.passages = passages
        self.token_counts = [count_tokens(p) for p in passages]
        tokenized = bm25s.tokenize(passages, show_progress=False)
        # A page without a word BM25 indexes (single letters, stopwords, symbols, emoji) has no
        # index (bm25s cannot build an empty one): every passage scores 0, so it is read in page order.
        self.bm25: bm25s.BM25 | None = None
        if tokenized.vocab:
            self.bm25 = bm25s.BM25()
            try:
                self.bm25.index(tokenized, show_progress=False)
            except ValueError as exc:
                raise PageNotIndexable("the page's text could not be indexed for retrieval") from exc
        # What the cache holds for this page: the passages (UTF-8 size plus str overhead), the
        # token counts, the BM25 matrix and vocabulary; close enough to bound memory by.
        arrays = vocab = 0
        if self.bm25 is not None:
            arrays = sum(v.nbytes for v in self.bm25.scores.values() if isinstance(v, np.ndarray))
            vocab = sum(len(term) + 80 for term in self.bm25.vocab_dict)
        self.nbytes = sum(len(p.encode()) + 50 for p in passages) + 28 * len(passages) + arrays + vocab

    def scores(self, question: str) -> np.ndarray:
        terms = _query_tokens(bm25s.tokenize([question], show_progress=False, allow_empty=True))
        if not terms or self.bm25 is None:
            return np.zeros(len(self.passages))
        return np.asarray(self.bm25.get_scores(terms), dtype=np.float64)


def _cut(text: str, token_budget: int, count_tokens: Callable[[str], int]) -> str:
    """The longest start of `text` found within `token_budget` tokens, ended after a word where it can be.

    Cut by characters, not by words: one word can be any length (a base64 blob, minified code, a
    long URL), and a 30 KB one kept whole made a 7,583-token prompt.
    """
    # Bisects on the length: `fits` is one known to fit, `over` the shortest known not to (or past
    # the bound). Only a length that was counted is kept, so the cut fits whatever the tokenizer.
    fits, over = 0, min(len(text), token_budget * _MAX_TOKEN_CHARS) + 1
    while over - fits > 1:
        mid = (fits + over) // 2
        if count_tokens(text[:mid]) <= token_budget:
            fits = mid
        else:
            over = mid
    cut = text[:fits]
    space = max(cut.rfind(" "), cut.rfind("\n"))
    if fits < len(text) and not text[fits].isspace() and space > 0:
        words = cut[:space].rstrip()
        if words and count_tokens(words) <= token_budget:
            cut = words
    return cut.rstrip()


def _query_tokens(tokenized: bm25s.tokenization.Tokenized) -> list[str]:
    inverse = {i: t for t, i in tokenized.vocab.items()}
    return [inverse[i] for i in tokenized.ids[0] if i in inverse and inverse[i] != ""]


class Retriever:
    """Chooses passages for a question within a token budget; thread-safe, with an LRU of pages.

    The LRU is bounded by pages and by bytes: 256 pages of 2 MB each would otherwise hold ~2 GB.
    """

    def __init__(
        self,
        count_tokens: Callable[[str], int],
        *,
        max_words: int = 80,
        cache_size: int = 256,
        cache_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._count_tokens = count_tokens
        self._max_words = max_words
        self._cache: OrderedDict[str, _Index] = OrderedDict()
        self._cache_size = cache_size
        self._cache_bytes = cache_bytes
        self._cached_bytes = 0
        self._lock = threading.Lock()

    @property
    def cached_bytes(self) -> int:
        """The estimated size of the pages' indexes in the cache."""
        return self._cached_bytes

    def _index(self, text: str) -> _Index:
        key = content_hash(text)
        with self._lock:
            index = self._cache.get(key)
            if index is not None:
                self._cache.move_to_end(key)
                return index
        index = _Index(split_passages(text, max_words=self._max_words) or [""], self._count_tokens)
        if index.nbytes > self._cache_bytes:
            return index  # a page larger than the whole cache is used once, not kept
        with self._lock:
            previous = self._cache.pop(key, None)  # another thread indexed the same page meanwhile
            if previous is not None:
                self._cached_bytes -= previous.nbytes
            self._cache[key] = index
            self._cached_bytes += index.nbytes
            while len(self._cache) > self._cache_size or self._cached_bytes > self._cache_bytes:
                _, evicted = self._cache.popitem(last=False)
                self._cached_bytes -= evicted.nbytes
        return index

    def select(self, text: str, question: str, *, token_budget: int) -> list[Passage]:
        """The best-scoring passages that fit the budget, in page order."""
        index = self._index(text)
        scores = index.scores(question)
        # Passages that share no term with the question only distract a small model; when none
        # does, the page's start is the best guess (ties keep page order).
        order = sorted(range(len(index.passages)), key=lambda i: (-scores[i], i))
        if scores.max(initial=0.0) > 0:
            order = [i for i in order if scores[i] > 0]
        chosen: list[int] = []
        used = 0
        for i in order:
            cost = index.token_counts[i]
            if used + cost > token_budget:
                if not chosen and cost > token_budget:
                    # A single passage over budget is cut rather than leaving the model blind.
                    cut = _cut(index.passages[i], token_budget, self._count_tokens)
                    return [Passage(i, cut, float(scores[i]))] if cut else []
                continue
            chosen.append(i)
            used += cost
        return [Passage(i, index.passages[i], float(scores[i])) for i in sorted(chosen)]
