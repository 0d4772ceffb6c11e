"""Token generation on the ONNX decoder: sampling, and a scheduler that batches decode steps.

One engine thread owns a decoder. New requests are prefilled one at a time (batch 1) and then join
the running batch; every decode step advances all running sequences at once, so concurrent requests
share each read of the weights instead of queueing behind each other.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from flywheel_model.runtime import Decoder

log = logging.getLogger(__name__)


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

    def should_stop(self) -> str | None:
        if self.cancelled.is_set():
            return "cancelled"
        if self.deadline is not None and time.monotonic() > self.deadline:
            return "deadline"
        return None


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
    ) -> None:
        if not decoder.batches and max_batch > 1:
            log.warning("batched decoding on CUDA is off (ORT__CUDA_BATCHING): max_batch %d -> 1", max_batch)
            max_batch = 1
        self.decoder = decoder
        # Tokens that end a sequence (not emitted): the model's end tokens unless the prompt adds some.
        self.stop_token_ids = stop_token_ids or decoder.spec.eos_token_ids
        self.max_batch = max_batch
        self.max_queue = max_queue
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

    def close(self, timeout: float | None = None) -> None:
        """Finishes queued and running sequences, then stops the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # Engine thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._active and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._pending and not self._active:
                    return
                admit = (
                    self._pending.popleft() if self._pending and len(self._active) < self.max_batch else None
                )
            if admit is not None:
                try:
                    self._admit(admit)
                except Exception as exc:  # one request's bad prompt ends that request alone
                    log.exception("admitting a sequence failed")
                    self._finish(admit, "error", exc)
            if not self._active or not (
                admit is None or not self._pending or len(self._active) >= self.max_batch
            ):
                continue
            try:
                self._step()
            except Exception as exc:  # a broken batch step fails its sequences, never the thread
                log.exception("generation step failed")
                for seq in self._active:
                    self._finish(seq, "error", exc)
                self._active = []
                self._cache.clear()

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
        reason = self._emit(seq, seq.sampler(logits))
        if reason:
            self._finish(seq, reason)
            return
        self._cache.append(kv, seq.length)
        self._active.append(seq)

    def _step(self) -> None:
        tokens = np.asarray([s.generated[-1] for s in self._active], dtype=np.int64)
        lengths = np.asarray([s.length for s in self._active], dtype=np.int64)
        logits = self.decoder.decode(tokens, lengths, self._cache)
        keep: list[int] = []
        for row, seq in enumerate(self._active):
            seq.length += 1
            reason = seq.should_stop()
            if reason is None:
                assert seq.sampler is not None
                try:
                    reason = self._emit(seq, seq.sampler(logits[row]))
                except Exception as exc:  # sampling this row failed: this sequence ends alone
                    log.exception("sampling a sequence failed")
                    self._finish(seq, "error", exc)
                    continue
            if reason:
                self._finish(seq, reason)
            else:
                keep.append(row)
        if len(keep) < len(self._active):
            order = self._cache.keep(keep, [s.length for s in self._active])
            self._active = [self._active[r] for r in order]
