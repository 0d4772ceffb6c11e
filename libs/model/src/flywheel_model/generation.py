"""Token generation on the ONNX decoder: sampling, and a scheduler that batches decode steps.

One engine thread owns a decoder. New requests are prefilled one at a time (batch 1) and then join
the running batch; every decode step advances all running sequences at once, so concurrent requests
share each read of the weights instead of queueing behind each other.

A greedy sequence may ask for several candidate answers (`Sequence.candidates`): its prompt is
prefilled once, each of the likeliest first tokens starts a row of its own in the batch, each row
goes on greedily (the others only while the sequence's `follows` accepts their tokens), and when
all have ended the sequence's `choose` picks one of the finished ones, whose tokens are then
emitted. Row 0 starts with the likeliest token, so it is the greedy answer.

Drafts: an answer copies much of its page, and a step that feeds a few tokens costs little more than
one that feeds one (the weights are read once either way). So while a greedy sequence decodes alone,
each step also feeds the tokens that followed its last few tokens where they occur earlier in its
prompt or answer (`draft`), checks every one against the logits before it, and emits each one they
agree with and the token after the last of those: the greedy answer, in fewer steps
(Decoder.check; docs/inference.md, "Drafts").
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from flywheel_model.runtime import KV, Decoder

log = logging.getLogger(__name__)

# The longest run of last tokens a draft looks for earlier in the sequence.
DRAFT_NGRAM = 3
# Tokens drafted at most per step (fewer where the graph checks fewer: Decoder.drafts).
DRAFT_TOKENS = 4


def draft(tokens: list[int] | np.ndarray, limit: int, ngram: int = DRAFT_NGRAM) -> list[int]:
    """Up to `limit` tokens that followed the latest earlier occurrence of the last n `tokens`, for
    the longest n up to `ngram` that occurs earlier; none where not even the last token does."""
    seq = np.asarray(tokens)
    for n in range(min(ngram, len(seq) - 1), 0, -1):
        # Starts i < len - n whose n tokens are the last n.
        hits = np.ones(len(seq) - n, dtype=bool)
        for j in range(n):
            hits &= seq[j : len(seq) - n + j] == seq[len(seq) - n + j]
        found = np.flatnonzero(hits)
        if found.size:
            start = int(found[-1]) + n
            return [int(t) for t in seq[start : start + limit]]
    return []


@dataclass(frozen=True)
class SamplingParams:
    """Decoding options, already validated and bounded by the caller."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


class Sampler:
    """Greedy when temperature is 0, else temperature + nucleus (top-p) sampling."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.params.temperature <= 0.0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / self.params.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if self.params.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, self.params.top_p) + 1)]
            kept = probs[keep] / probs[keep].sum()
            return int(keep[self._rng.choice(len(keep), p=kept)])
        return int(self._rng.choice(len(probs), p=probs))


@dataclass
class Sequence:
    """One request in the engine; callbacks run on the engine thread and must not block."""

    prompt_ids: list[int]
    params: SamplingParams
    on_token: Callable[[int], None]
    on_finish: Callable[[str, BaseException | None], None]
    deadline: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    length: int = 0
    sampler: Sampler | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    # Candidate answers decoded when greedy (rows in the batch), and what picks one of them from
    # their token ids (an index; without it, the greedy answer).
    candidates: int = 1
    choose: Callable[[list[list[int]]], int] | None = None
    # Whether a candidate after the first may go on (it cannot be chosen once it may not).
    follows: Callable[[list[int]], bool] | None = None

    def should_stop(self) -> str | None:
        if self.cancelled.is_set():
            return "cancelled"
        if self.deadline is not None and time.monotonic() > self.deadline:
            return "deadline"
        return None


@dataclass
class _Row(Sequence):
    """A candidate's row: after the first, one that `follows` rejects ends early, unfinished."""

    rank: int = 0

    def should_stop(self) -> str | None:
        reason = super().should_stop()
        if reason is None and self.rank and self.follows is not None and not self.follows(self.generated):
            return "unfollowed"
        return reason


@dataclass
class _Candidates:
    """A sequence's candidate rows: each ends on its own; the sequence ends when all have."""

    seq: Sequence
    rows: list[_Row]
    ended: dict[int, tuple[str, BaseException | None]] = field(default_factory=dict)

    def on_finish(self, row: int) -> Callable[[str, BaseException | None], None]:
        return lambda reason, error: self.end(row, reason, error)

    def end(self, row: int, reason: str, error: BaseException | None) -> None:
        self.ended[row] = (reason, error)
        if len(self.ended) < len(self.rows):
            return
        seq = self.seq
        error = next((e for _, e in self.ended.values() if e is not None), None)
        complete = [i for i, (r, _) in sorted(self.ended.items()) if r in COMPLETE]
        pick = complete[0] if complete else 0
        if error is None and len(complete) > 1 and seq.choose is not None:
            try:
                chosen = seq.choose([self.rows[i].generated for i in complete])
                pick = complete[chosen]
            except Exception:  # a failed choice keeps the greedy answer
                log.exception("choosing among candidate answers failed")
        reason = "error" if error is not None else self.ended[pick][0]
        if error is None:
            for token in self.rows[pick].generated:
                seq.generated.append(token)
                try:
                    seq.on_token(token)
                except Exception as exc:
                    log.exception("a sequence's on_token callback failed")
                    reason, error = "error", exc
                    break
        try:
            seq.on_finish(reason, error)
        except Exception:
            log.exception("a sequence's on_finish callback failed")


def _ignore(token: int) -> None:
    """A candidate row's tokens stay in its `generated` until one is chosen."""


# The reasons a row's answer is whole.
COMPLETE = ("eos", "max_tokens", "context_length")


class QueueFull(Exception):
    """The engine's queue is full."""


class BatchGenerator:
    """Runs sequences on one decoder in its own thread, batching their decode steps."""

    def __init__(
        self,
        decoder: Decoder,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        stop_token_ids: tuple[int, ...] | None = None,
        on_check: Callable[[int, int], None] | None = None,
    ) -> None:
        if not decoder.batches and max_batch > 1:
            log.warning("batched decoding on CUDA is off (ORT__CUDA_BATCHING): max_batch %d -> 1", max_batch)
            max_batch = 1
        self.decoder = decoder
        # Tokens that end a sequence (not emitted): the model's end tokens unless the prompt adds some.
        self.stop_token_ids = stop_token_ids or decoder.spec.eos_token_ids
        self.max_batch = max_batch
        self.max_queue = max_queue
        # Told, on the engine thread, after each step that checked drafts: how many there were and
        # how many the model agreed with (the inference service's drafted-tokens metric).
        self.on_check = on_check
        self._pending: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []
        self._cache = decoder.new_cache(max_batch)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="generator", daemon=True)
        self._thread.start()

    @property
    def load(self) -> int:
        """Sequences waiting or running."""
        with self._cond:
            return len(self._pending) + len(self._active)

    def submit(self, seq: Sequence) -> None:
        """Queues a sequence; QueueFull when the queue is at its bound, RuntimeError when closed."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("generator is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull
            self._pending.append(seq)
            self._cond.notify()

    def close(self, timeout: float | None = None) -> bool:
        """Finishes queued and running sequences, then stops the thread; whether it has stopped."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # Engine thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._active and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._pending and not self._active:
                    return
                admit = self._pending.popleft() if self._pending and self._fits(self._pending[0]) else None
            if admit is not None:
                try:
                    self._admit(admit)
                except Exception as exc:  # one request's bad prompt ends that request alone
                    log.exception("admitting a sequence failed")
                    self._finish(admit, "error", exc)
            full = bool(self._pending) and not self._fits(self._pending[0])
            if not self._active or not (admit is None or not self._pending or full):
                continue
            try:
                self._step()
            except Exception as exc:  # a broken batch step fails its sequences, never the thread
                log.exception("generation step failed")
                for seq in self._active:
                    self._finish(seq, "error", exc)
                self._active = []
                self._cache.clear()

    def _rows(self, seq: Sequence) -> int:
        """The batch rows a sequence takes: its candidates when greedy, at most a whole batch."""
        if seq.candidates > 1 and seq.params.temperature <= 0.0:
            return min(seq.candidates, self.max_batch)
        return 1

    def _fits(self, seq: Sequence) -> bool:
        return len(self._active) + self._rows(seq) <= self.max_batch

    def _finish(self, seq: Sequence, reason: str, error: BaseException | None = None) -> None:
        try:
            seq.on_finish(reason, error)
        except Exception:  # the caller's callback must not take the batch down with it
            log.exception("a sequence's on_finish callback failed")

    def _emit(self, seq: Sequence, token: int) -> str | None:
        """Records a sampled token; returns the finish reason when the sequence is done."""
        if token in self.stop_token_ids:
            return "eos"
        seq.generated.append(token)
        try:
            seq.on_token(token)
        except Exception:  # the caller's callback failed: end its sequence, not the batch
            log.exception("a sequence's on_token callback failed")
            return "error"
        if len(seq.generated) >= seq.params.max_new_tokens:
            return "max_tokens"
        if seq.length + 1 >= self.decoder.spec.context_length:
            return "context_length"
        return None

    def _admit(self, seq: Sequence) -> None:
        seq.admitted_at = time.monotonic()
        reason = seq.should_stop()
        if reason:
            self._finish(seq, reason)
            return
        if not 0 < len(seq.prompt_ids) < self.decoder.spec.context_length:
            raise ValueError(
                f"a prompt of {len(seq.prompt_ids)} tokens does not fit the context of "
                f"{self.decoder.spec.context_length}"
            )
        seq.sampler = Sampler(seq.params)
        logits, kv = self.decoder.prefill(seq.prompt_ids)
        seq.length = len(seq.prompt_ids)
        count = self._rows(seq)
        if count == 1:
            self._start(seq, seq.sampler(logits), kv)
            return
        # The likeliest first tokens, likeliest first, the lower id first on a tie (as argmax: row 0
        # is the greedy answer).
        top = np.argpartition(-logits, count - 1)[:count]
        firsts = top[np.lexsort((top, -logits[top]))]
        group = _Candidates(seq, [])
        for i in range(len(firsts)):
            group.rows.append(
                _Row(
                    seq.prompt_ids,
                    seq.params,
                    on_token=_ignore,
                    on_finish=group.on_finish(i),
                    deadline=seq.deadline,
                    cancelled=seq.cancelled,
                    length=seq.length,
                    sampler=seq.sampler,
                    follows=seq.follows,
                    rank=i,
                )
            )
        # Every row exists before any starts: one that ends on its first token must not end them all.
        for row, first in zip(group.rows, firsts, strict=True):
            self._start(row, int(first), kv)

    def _start(self, seq: Sequence, token: int, kv: KV) -> None:
        """Emits a prefilled sequence's first token; it joins the batch unless that ended it."""
        reason = self._emit(seq, token)
        if reason:
            self._finish(seq, reason)
            return
        self._cache.append(kv, seq.length)
        self._active.append(seq)

    def _step(self) -> None:
        if len(self._active) == 1:
            drafts = self._drafts(self._active[0])
            if drafts:
                self._check(self._active[0], drafts)
                return
        tokens = np.asarray([s.generated[-1] for s in self._active], dtype=np.int64)
        lengths = np.asarray([s.length for s in self._active], dtype=np.int64)
        logits = self.decoder.decode(tokens, lengths, self._cache)
        keep = [row for row, seq in enumerate(self._active) if self._advance(seq, logits[row])]
        if len(keep) < len(self._active):
            order = self._cache.keep(keep, [s.length for s in self._active])
            self._active = [self._active[r] for r in order]

    def _advance(self, seq: Sequence, logits: np.ndarray) -> bool:
        """Counts the step's token into the sequence's cache and emits the next, sampled from
        `logits`; whether the sequence goes on."""
        seq.length += 1
        reason = seq.should_stop()
        if reason is None:
            assert seq.sampler is not None
            try:
                reason = self._emit(seq, seq.sampler(logits))
            except Exception as exc:  # sampling this row failed: this sequence ends alone
                log.exception("sampling a sequence failed")
                self._finish(seq, "error", exc)
                return False
        if reason:
            self._finish(seq, reason)
            return False
        return True

    def _drafts(self, seq: Sequence) -> list[int]:
        """Tokens to check after a greedy sequence's last one, within its token and context limits."""
        limit = min(
            DRAFT_TOKENS,
            self.decoder.drafts,
            seq.params.max_new_tokens - len(seq.generated) - 1,
            self.decoder.spec.context_length - seq.length - 2,
        )
        if limit <= 0 or seq.params.temperature > 0.0:
            return []
        return draft(seq.prompt_ids + seq.generated, limit)

    def _check(self, seq: Sequence, drafts: list[int]) -> None:
        """One step of the sequence alone with its drafts: emits the tokens its logits agree with
        and the next one after them."""
        logits = self.decoder.check([seq.generated[-1], *drafts], seq.length, self._cache)
        agreed = 0
        for i, row in enumerate(logits):
            if not self._advance(seq, row):
                self._active = []
                self._cache.clear()
                break
            if i == len(drafts) or seq.generated[-1] != drafts[i]:
                break
            agreed += 1
        if self.on_check is not None:
            try:
                self.on_check(len(drafts), agreed)
            except Exception:  # a metric must not end the batch
                log.exception("the on_check callback failed")
