"""Grounded decoding: an answer copied from the page's passages, or "The page does not say."

A small model asked about a page often answers from what it remembers, restates the question, or
drifts into text the page never had. Grounded decoding keeps the model's own ranking of the next
token but only takes a token that keeps the answer a contiguous piece of the passages it was shown
(compared case-insensitively, whitespace collapsed), or a prefix of the no-answer sentence. It may
stop only where a word of the passage ends. When none of the model's `top_k` likeliest tokens
keeps the answer grounded, it stops (or, before the first token, answers freely: the fallback).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

_SPACES = re.compile(r"\s+")


def _squash(text: str) -> str:
    return _SPACES.sub(" ", text).lower()


class Vocabulary:
    """The text of every token id, decoded once per tokenizer (a token on its own)."""

    def __init__(self, texts: Sequence[str], eos_token_ids: Sequence[int]) -> None:
        self.texts = list(texts)
        self.eos_token_ids = frozenset(eos_token_ids)


class GroundedChooser:
    """Picks each next token of one answer so that the answer stays a span of `sources`."""

    def __init__(self, vocabulary: Vocabulary, sources: Sequence[str], *, top_k: int = 40) -> None:
        self.vocabulary = vocabulary
        # One string to search; the separator matches no answer text, so no span crosses a passage edge.
        self.source = "\x00".join(_squash(s).strip() for s in sources if s.strip())
        self.top_k = top_k
        self.text = ""
        self.free = False

    def _occurs(self, text: str, *, whole: bool) -> bool:
        """Whether `text` occurs in the sources starting where a word starts (and, if `whole`,
        ending where one ends): an answer never starts or stops inside a word."""
        if not text:
            return False
        source = self.source
        start = source.find(text)
        while start >= 0:
            end = start + len(text)
            starts = start == 0 or not source[start - 1].isalnum() or not text[0].isalnum()
            ends = end == len(source) or not source[end].isalnum() or not text[-1].isalnum()
            if starts and (ends or not whole):
                return True
            start = source.find(text, start + 1)
        return False

    def __call__(self, logits: np.ndarray) -> int:
        """The next token: the likeliest one that keeps the answer grounded."""
        if self.free:
            return int(np.argmax(logits))
        k = min(self.top_k, logits.shape[-1])
        top = np.argpartition(-logits, k - 1)[:k]
        for token in top[np.argsort(-logits[top])]:
            token = int(token)
            if token in self.vocabulary.eos_token_ids:
                if self._occurs(self.text.strip(), whole=True):
                    return token
                continue
            candidate = _squash(self.text + self.vocabulary.texts[token])
            if self._occurs(candidate.lstrip(), whole=False):
                self.text = candidate
                return token
        if self.text.strip():
            return min(self.vocabulary.eos_token_ids)
        # Nothing grounded is likely enough to start with: this answer is decoded freely.
        self.free = True
        return int(np.argmax(logits))
