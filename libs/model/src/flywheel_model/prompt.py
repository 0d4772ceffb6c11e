"""The prompt: page passages and the question in the model's own chat template.

Serving, evaluation and training all build prompts here, so a model is trained on exactly the
prompts it is later asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flywheel_model.retrieval import Passage

SYSTEM_PROMPT = (
    "You answer a visitor's question about a web page. Use only the page text you are given. "
    "Answer briefly, in one sentence. If the page does not contain the answer, say: "
    '"The page does not say."'
)
NO_ANSWER = "The page does not say."
# A title only names the page; past this it would take room from the passages that answer.
TITLE_MAX_CHARS = 200


class PromptTooLong(ValueError):
    """The parts of a prompt that cannot be cut (instructions, question) leave no room to answer."""


def short_title(title: str) -> str:
    """The title cut to TITLE_MAX_CHARS at a word boundary (the same in serving, evaluation, training)."""
    title = title.strip()
    if len(title) <= TITLE_MAX_CHARS:
        return title
    cut = title[:TITLE_MAX_CHARS]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut) + "…"


def build_messages(title: str, passages: Sequence[Passage], question: str) -> list[dict[str, str]]:
    """Chat messages for one question about one page."""
    context = "\n\n".join(p.text for p in passages)
    title = short_title(title)
    header = f"Page title: {title}\n\n" if title else ""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"{header}Page text:\n{context}\n\nQuestion: {question.strip()}"},
    ]


class PromptEncoder:
    """Tokenizes prompts with a model's tokenizer and chat template."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt token ids, ending where the assistant's answer starts."""
        return list(self.tokenizer(self.prompt_text(messages), add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back incomplete characters."""

    def __init__(self, encoder: PromptEncoder) -> None:
        self._encoder = encoder
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._encoder.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[self._emitted :]
        self._emitted = len(text)
        return delta

    def text(self) -> str:
        return self._encoder.decode(self._ids)
