"""The question-answering engine: retrieval, prompt and batched generation for one model version.

The inference service serves through it and the evaluator measures through it, so a version is
evaluated on exactly the path that serves it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flywheel_model import candidates
from flywheel_model.generation import BatchGenerator, SamplingParams, Sequence
from flywheel_model.prompt import IncrementalDetokenizer, PromptEncoder, PromptTooLong, build_messages
from flywheel_model.retrieval import Passage, Retriever
from flywheel_model.runtime import Decoder, OrtSettings, release_memory

# Prompt tokens a passage may take beyond its own count: the retriever counts each passage alone, and
# the separator after it and token merges at its edges are not in that count (measured on real
# pages: 2 a passage with SmolLM2's tokenizer, 1 with Gemma 3's).
_EDGE_TOKENS = 2


@dataclass(frozen=True)
class EngineSettings:
    """Limits of one engine."""

    context_token_budget: int = 400
    passage_max_words: int = 80
    max_batch: int = 16
    max_queue: int = 64
    # Candidate answers of a greedy request (flywheel_model.candidates chooses one); 1 is plain greedy.
    answer_candidates: int = 4


@dataclass
class PreparedPrompt:
    """A question made ready for generation."""

    passages: list[Passage]
    token_ids: list[int]
    page_text: str
    retrieval_ms: float


@dataclass
class AnswerResult:
    """A finished answer with its timings."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    passages: list[Passage]
    time_to_first_token_ms: float
    total_ms: float
    token_ids: list[int] = field(default_factory=list)


class AnswerEngine:
    """Loads one model folder (ONNX + tokenizer) and answers questions about pages with it."""

    def __init__(
        self,
        model_dir: Path,
        ort_settings: OrtSettings,
        settings: EngineSettings,
        on_check: Callable[[int, int], None] | None = None,
    ) -> None:
        """`on_check`: told of each decode step's drafted and agreed tokens (BatchGenerator)."""
        self.model_dir = Path(model_dir)
        self.settings = settings
        self.encoder = PromptEncoder(self.model_dir)
        self.decoder = Decoder(self.model_dir, ort_settings)
        self.decoder.cache_prefix(self.encoder.shared_prefix())
        self.retriever = Retriever(self.encoder.count_tokens, max_words=settings.passage_max_words)
        # The model's end tokens, and the line end where the prompt is plain (prompt.PLAIN_TEMPLATE).
        self.stop_token_ids = self.encoder.stop_token_ids(self.decoder.spec.eos_token_ids)
        self.generator = BatchGenerator(
            self.decoder,
            # A batch holds at least one request's candidates, so a version answers alike whatever
            # its batch size (one measurement); where the decoder does not batch (CUDA unless
            # ORT__CUDA_BATCHING), one row at a time, so greedily.
            max_batch=max(settings.max_batch, settings.answer_candidates),
            max_queue=settings.max_queue,
            stop_token_ids=self.stop_token_ids,
            on_check=on_check,
        )

    @property
    def provider(self) -> str:
        return self.decoder.provider

    def prepare(self, page_text: str, title: str, question: str, max_new_tokens: int = 0) -> PreparedPrompt:
        """Chooses passages and builds a prompt that leaves `max_new_tokens` of the model's context.

        What can be cut is cut (the title by build_messages, then passages, least relevant first);
        PromptTooLong when the question alone leaves no room. Whatever the page, its passages take
        at most `context_token_budget` tokens of the prompt, and their separators _EDGE_TOKENS each.
        """
        started = time.perf_counter()
        room = self.decoder.spec.context_length - max_new_tokens
        fixed = len(self.encoder.encode(build_messages(title, [], question)))
        if fixed > room:
            raise PromptTooLong(
                f"the question takes {fixed} tokens; the model's context of "
                f"{self.decoder.spec.context_length} tokens leaves {room} once the answer's room is kept"
            )
        budget = min(self.settings.context_token_budget, room - fixed)
        passages = self.retriever.select(page_text, question, token_budget=max(budget, 0))
        ids = self.encoder.encode(build_messages(title, passages, question))
        # The prompt is checked as encoded, not as the retriever counted it: drop the least relevant
        # passage until it fits the context and its passages fit the budget. Checking the context
        # alone let a 7,500-token passage through a 400-token budget.
        while passages and len(ids) > min(room, fixed + budget + _EDGE_TOKENS * len(passages)):
            passages.remove(min(passages, key=lambda p: p.score))
            ids = self.encoder.encode(build_messages(title, passages, question))
        return PreparedPrompt(passages, ids, page_text, (time.perf_counter() - started) * 1000)

    def sequence(
        self,
        prepared: PreparedPrompt,
        question: str,
        params: SamplingParams,
        on_token: Callable[[int], None],
        on_finish: Callable[[str, BaseException | None], None],
        deadline: float | None = None,
    ) -> Sequence:
        """The generator's sequence for a prepared question: with `answer_candidates` candidates
        (when greedy), the one its passages say among the most of the question's words."""
        passages = candidates.Passages.of([p.text for p in prepared.passages])

        def choose(answers: list[list[int]]) -> int:
            return candidates.choose(question, passages, [self.encoder.decode(ids) for ids in answers])

        def follows(ids: list[int]) -> bool:
            return candidates.continues(self.encoder.decode(ids), passages)

        return Sequence(
            prepared.token_ids,
            params,
            on_token,
            on_finish,
            deadline=deadline,
            candidates=self.settings.answer_candidates,
            choose=choose,
            follows=follows,
        )

    def answer(self, page_text: str, title: str, question: str, params: SamplingParams) -> AnswerResult:
        """Answers synchronously (for evaluation and benchmarks); safe to call from many threads."""
        prepared = self.prepare(page_text, title, question, params.max_new_tokens)
        started = time.perf_counter()
        first: list[float] = []
        tokens: list[int] = []
        done = threading.Event()
        outcome: list[tuple[str, BaseException | None]] = []

        def on_token(token: int) -> None:
            if not first:
                first.append(time.perf_counter())
            tokens.append(token)

        def on_finish(reason: str, error: BaseException | None) -> None:
            outcome.append((reason, error))
            done.set()

        self.generator.submit(self.sequence(prepared, question, params, on_token, on_finish))
        done.wait()
        reason, error = outcome[0]
        if error is not None:
            raise error
        finished = time.perf_counter()
        detok = IncrementalDetokenizer(self.encoder)
        for t in tokens:
            detok.push(t)
        return AnswerResult(
            text=detok.text().strip(),
            finish_reason=reason,
            prompt_tokens=len(prepared.token_ids),
            completion_tokens=len(tokens),
            passages=prepared.passages,
            time_to_first_token_ms=((first[0] if first else finished) - started) * 1000,
            total_ms=(finished - started) * 1000,
            token_ids=tokens,
        )

    def close(self, timeout: float | None = None) -> None:
        """Finishes the work in hand and stops the generator thread; then lets the model's memory go
        (to the system, not only to this process's heap: a service that swaps versions would
        otherwise keep the old one's footprint)."""
        if self.generator.close(timeout):
            self.decoder.close()
            release_memory()
