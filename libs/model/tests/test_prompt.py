"""The prompt the model folder chooses: its chat template, or the plain prompt that ends at the line's end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flywheel_model.prompt import PLAIN_TEMPLATE, SYSTEM_PROMPT, PromptEncoder, build_messages
from flywheel_model.retrieval import Passage

MESSAGES = build_messages("Kafka", [Passage(0, "A topic is split into partitions.")], "What splits a topic?")
EOS = (2,)


def test_the_question_comes_before_the_page_text_and_again_after_it() -> None:
    system, user = MESSAGES
    assert system == {"role": "system", "content": SYSTEM_PROMPT}
    assert user["content"] == (
        "Page title: Kafka\n\nQuestion: What splits a topic?\n\n"
        "Page text:\nA topic is split into partitions.\n\nQuestion: What splits a topic?"
    )


@pytest.fixture(scope="module")
def plain_model_dir(onnx_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SmolLM2 tokenizer without its chat template, as a pretrained base model's folder has it."""
    out = tmp_path_factory.mktemp("plain")
    shutil.copy2(onnx_model_dir / "tokenizer.json", out / "tokenizer.json")
    config = json.loads((onnx_model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.integration
def test_a_tokenizer_with_a_chat_template_gets_it(onnx_model_dir: Path) -> None:
    encoder = PromptEncoder(onnx_model_dir)
    assert encoder.chat
    text = encoder.prompt_text(MESSAGES)
    assert "Short answer:" not in text and MESSAGES[1]["content"] in text
    assert encoder.conversation_text(MESSAGES, " In partitions. ").startswith(text)
    assert encoder.stop_token_ids(EOS) == EOS


@pytest.mark.integration
def test_a_tokenizer_without_a_chat_template_gets_the_plain_prompt(plain_model_dir: Path) -> None:
    encoder = PromptEncoder(plain_model_dir)
    assert not encoder.chat
    text = encoder.prompt_text(MESSAGES)
    body = PLAIN_TEMPLATE.format(system=MESSAGES[0]["content"], user=MESSAGES[1]["content"])
    assert text == (encoder.tokenizer.bos_token or "") + body
    assert text.endswith("\nQuestion: What splits a topic?\nShort answer:")
    # Training appends the answer to exactly the prompt that serving encodes.
    assert encoder.conversation_text(MESSAGES, " Partitions. ") == text + " Partitions."
    ids = encoder.encode(MESSAGES)
    assert ids == encoder.tokenizer(text, add_special_tokens=False)["input_ids"]
    if encoder.tokenizer.bos_token_id is not None:
        assert ids[0] == encoder.tokenizer.bos_token_id and ids.count(ids[0]) == 1


@pytest.mark.integration
def test_the_plain_prompt_stops_at_the_end_of_the_answers_line(plain_model_dir: Path) -> None:
    encoder = PromptEncoder(plain_model_dir)
    stops = encoder.stop_token_ids(EOS)
    assert stops[0] == EOS[0]  # the model's own end token stays first: training appends it
    newline = encoder.tokenizer("a\nb", add_special_tokens=False)["input_ids"]
    assert set(newline) & set(stops)
    assert all("\n" in encoder.tokenizer.decode([t]) for t in stops[1:])
    assert not set(encoder.tokenizer(" Partitions.", add_special_tokens=False)["input_ids"]) & set(stops)


@pytest.mark.integration
@pytest.mark.parametrize("template", ["chat", "plain"])
def test_every_prompt_starts_with_the_shared_prefix_of_instructions_and_template(
    template: str, onnx_model_dir: Path, plain_model_dir: Path
) -> None:
    encoder = PromptEncoder(onnx_model_dir if template == "chat" else plain_model_dir)
    prefix = encoder.shared_prefix()
    assert SYSTEM_PROMPT in encoder.decode(prefix)
    others = [
        MESSAGES,
        build_messages("", [], "Why?"),
        build_messages("Page title: x", [Passage(3, "Question: y")], "Short answer:"),
    ]
    for messages in others:
        ids = encoder.encode(messages)
        assert ids[: len(prefix)] == prefix and len(ids) > len(prefix)
    assert "Kafka" not in encoder.decode(prefix) and "topic" not in encoder.decode(prefix)
