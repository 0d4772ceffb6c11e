"""Training data for a job: the batch, earlier batches the base has not learned, replay; as token ids."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flywheel_common.errors import NotFound
from flywheel_common.registry import ModelRegistry
from flywheel_eval.metrics import contains
from flywheel_model.prompt import PromptEncoder, build_messages
from flywheel_model.retrieval import Passage
from flywheel_trainer.datasets import Dataset


@dataclass(frozen=True)
class Tokenized:
    """One example: prompt ids then answer ids (ending with the stop token); loss on the answer only."""

    example_id: str
    input_ids: list[int]
    prompt_len: int
    # The same prompt with an answer to prefer less (the model answer a correction replaced), or empty.
    rejected_ids: list[int] = field(default_factory=list)

    @property
    def answer_tokens(self) -> int:
        return len(self.input_ids) - self.prompt_len


def messages_of(example: dict[str, Any]) -> list[dict[str, str]]:
    """The exact chat messages the model was asked (the interaction's passages, in order)."""
    passages = [Passage(i, text) for i, text in enumerate(example.get("passages") or [])]
    return build_messages(example.get("page_title", ""), passages, example["question"])


def answer_ids(
    encoder: PromptEncoder, messages: list[dict[str, str]], answer: str, eos_ids: Sequence[int]
) -> list[int]:
    """Token ids of the assistant's turn after the prompt, up to and including the stop token.

    Taken from the prompt with the answer appended (PromptEncoder.conversation_text), so the model
    learns to end its turn the way the chat template does; the stop token is added when it has none.
    """
    prompt = encoder.prompt_text(messages)
    full = encoder.conversation_text(messages, answer)
    suffix = full[len(prompt) :] if full.startswith(prompt) else answer.strip()
    ids = list(encoder.tokenizer(suffix, add_special_tokens=False)["input_ids"])
    for i, token in enumerate(ids):
        if token in eos_ids:
            return ids[: i + 1]
    return [*ids, eos_ids[0]]


def preference_pair(example: dict[str, Any]) -> str | None:
    """The model answer an expert's correction replaced, when it is a real alternative to prefer less:
    present, and not already holding the corrected answer."""
    if example.get("source") != "correction":
        return None
    rejected = (example.get("model_answer") or "").strip()
    if not rejected or contains(rejected, [example["answer"]]):
        return None
    return rejected


def tokenize(
    examples: Iterable[dict[str, Any]],
    encoder: PromptEncoder,
    eos_ids: Sequence[int],
    max_tokens: int,
    *,
    preferences: bool = False,
) -> tuple[list[Tokenized], list[str]]:
    """Tokenized examples, and the ids of those skipped as longer than `max_tokens` (never truncated:
    a truncated prompt is not one the model is ever asked). With `preferences`, corrections carry the
    answer they replaced as the rejected one."""
    out: list[Tokenized] = []
    skipped: list[str] = []
    for example in examples:
        messages = messages_of(example)
        prompt = encoder.encode(messages)
        answer = answer_ids(encoder, messages, example["answer"], eos_ids)
        if len(prompt) + len(answer) > max_tokens:
            skipped.append(example["id"])
            continue
        rejected_text = preference_pair(example) if preferences else None
        rejected: list[int] = []
        if rejected_text is not None:
            rejected_answer = answer_ids(encoder, messages, rejected_text, eos_ids)
            if len(prompt) + len(rejected_answer) <= max_tokens:
                rejected = [*prompt, *rejected_answer]
        out.append(Tokenized(example["id"], [*prompt, *answer], len(prompt), rejected))
    return out, skipped


def _key(example: dict[str, Any]) -> tuple[str, str]:
    return (example.get("page_title", ""), " ".join(example["question"].lower().split()))


# An example's fields that name one request or one feedback, not what it says.
_PER_REQUEST = frozenset({"id", "query_id", "feedback_id"})


def _content(example: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in example.items() if k not in _PER_REQUEST}, sort_keys=True)


def learned_datasets(registry: ModelRegistry, version: str) -> set[str]:
    """The datasets `version` was trained on: those of every candidate in its lineage, back to the base."""
    learned: set[str] = set()
    seen: set[str] = set()
    while version and version not in seen:
        seen.add(version)
        try:
            lineage = registry.get(version).manifest.get("lineage") or {}
        except NotFound:
            break
        learned.update(lineage.get("datasets") or [lineage.get("dataset_id", "")])
        version = lineage.get("parent_version", "")
    learned.discard("")
    return learned


def carry_over(
    dataset: Dataset, unlearned: Sequence[Dataset], *, max_examples: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """This batch's examples, then whole earlier batches the base has not learned, newest first.

    Batches are taken while their examples fit in `max_examples`; a question asked again keeps its
    newest answer. Returns the examples and the ids of the datasets they come from (this one first).
    """
    examples = list(dataset.examples)
    keys = {_key(e) for e in examples}
    sources = [dataset.dataset_id]
    carried = 0
    for d in reversed(unlearned):
        new = {_key(e): e for e in d.examples if _key(e) not in keys}
        carried += len(new)
        if carried > max_examples:
            break
        examples.extend(new.values())
        keys.update(new)
        sources.append(d.dataset_id)
    return examples, sources


def select_replay(
    current: Sequence[dict[str, Any]],
    earlier: Sequence[Dataset],
    *,
    fraction: float,
    max_examples: int,
    seed: int,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Earlier datasets' examples mixed into `current`: `fraction` of its size, at most `max_examples`.

    Questions `current` answers again are left out (the newer answer wins); the draw is seeded.
    Returns the examples and the ids of the datasets they come from.
    """
    want = min(round(fraction * len(current)), max_examples)
    if want <= 0:
        return [], []
    current_ids = {e["id"] for e in current}
    current_keys = {_key(e) for e in current}
    pool: dict[str, tuple[str, dict[str, Any]]] = {}
    for d in earlier:
        for e in d.examples:
            if e["id"] not in current_ids and _key(e) not in current_keys:
                pool[e["id"]] = (d.dataset_id, e)
    # Drawn from an order of their content: ids are made from random query and feedback ids, so an
    # order of ids would replay other examples each time the same feedback comes in again.
    ids = sorted(pool, key=lambda i: _content(pool[i][1]))
    chosen = random.Random(seed).sample(ids, min(want, len(ids)))
    picked = [pool[i] for i in sorted(chosen)]
    return [e for _, e in picked], sorted({d for d, _ in picked})
