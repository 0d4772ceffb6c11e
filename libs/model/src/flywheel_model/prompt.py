"""The prompt: page passages and the question in the model's own chat template, or a plain one.

Serving, evaluation and training all build prompts here, so a model is trained on exactly the
prompts it is later asked. The model folder chooses: a tokenizer with a chat template gets it; one
without (a pretrained base model) gets PLAIN_TEMPLATE, whose answer ends with its line.
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
# The prompt of a model without a chat template: the same instructions and page text, then the line
# the answer completes. A base model goes on past the answer (another "Question:"), so the answer
# ends where its line does (PromptEncoder.stop_token_ids).
PLAIN_TEMPLATE = "{system}\n\n{user}\nShort answer:"
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
    """Chat messages for one question about one page. The question comes before the page text as
    well as after it: a causal model then reads the page knowing what it looks for, since each page
    token can attend to the question (docs/quality.md, "The question before the page")."""
    context = "\n\n".join(p.text for p in passages)
    title = short_title(title)
    header = f"Page title: {title}\n\n" if title else ""
    asked = f"Question: {question.strip()}"
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"{header}{asked}\n\nPage text:\n{context}\n\n{asked}"},
    ]


def plain_text(messages: list[dict[str, str]], bos_token: str | None) -> str:
    """The messages as PLAIN_TEMPLATE, after the tokenizer's start token (a chat template writes it too)."""
    parts = {m["role"]: m["content"] for m in messages}
    return (bos_token or "") + PLAIN_TEMPLATE.format(system=parts["system"], user=parts["user"])


def _line_end_candidates(tokens: Sequence[str]) -> list[int]:
    # How a newline looks inside a vocabulary: itself (SentencePiece), byte-level BPE's "Ċ", or a
    # byte-fallback token. Candidates only: each is confirmed by decoding it.
    return [i for i, t in enumerate(tokens) if t and ("\n" in t or "Ċ" in t or t == "<0x0A>")]


class PromptEncoder:
    """Tokenizes prompts with a model's tokenizer and its chat template, or PLAIN_TEMPLATE without one."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir))
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        self._stops: tuple[int, ...] | None = None

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        if not self.chat:
            return plain_text(messages, self.tokenizer.bos_token)
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def conversation_text(self, messages: list[dict[str, str]], answer: str) -> str:
        """The prompt followed by `answer` as the model is to write it (what training teaches)."""
        if not self.chat:
            return f"{self.prompt_text(messages)} {answer.strip()}"
        turn = {"role": "assistant", "content": answer.strip()}
        return str(self.tokenizer.apply_chat_template([*messages, turn], tokenize=False))

    def stop_token_ids(self, eos_ids: Sequence[int]) -> tuple[int, ...]:
        """The tokens that end an answer: the model's `eos_ids` (first), and with the plain prompt
        every token that holds a line break."""
        if self.chat:
            return tuple(eos_ids)
        if self._stops is None:
            vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
            self._stops = tuple(i for i in _line_end_candidates(vocab) if "\n" in self.tokenizer.decode([i]))
        return tuple(dict.fromkeys([*eos_ids, *self._stops]))

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt token ids, ending where the assistant's answer starts."""
        return list(self.tokenizer(self.prompt_text(messages), add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def shared_prefix(self) -> list[int]:
        """The tokens every prompt starts with (start token, instructions, the template up to the
        page): what two prompts that share nothing of their own have in common."""
        first = self.encode(build_messages("A", [Passage(0, "x")], "y?"))
        second = self.encode(build_messages("", [], "Q"))
        n = 0
        while n < min(len(first), len(second)) and first[n] == second[n]:
            n += 1
        return first[:n]


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
