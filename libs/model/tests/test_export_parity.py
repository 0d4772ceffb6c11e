"""The exported ONNX decoder answers exactly like the PyTorch model it was exported from."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel_model.engine import AnswerEngine, EngineSettings
from flywheel_model.generation import SamplingParams
from flywheel_model.prompt import build_messages
from flywheel_model.retrieval import Passage
from flywheel_model.runtime import OrtSettings

PROMPTS = [
    (
        "Python FAQ",
        "Python is a programming language created by Guido van Rossum in 1991.",
        "Who made Python?",
    ),
    ("Kafka", "Apache Kafka stores streams of records in topics, split into partitions.", "What is a topic?"),
    ("Recipes", "Bake the bread at 220 degrees for 35 minutes, then let it cool.", "How long to bake?"),
    ("Licence", "The software is distributed under the Apache 2.0 licence.", "Which licence applies?"),
    ("Empty", "The museum opens at nine.", "What is the capital of Peru?"),
]
NEW_TOKENS = 24


@pytest.mark.integration
def test_onnx_greedy_equals_pytorch_greedy(prepared_model: Path) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    engine = AnswerEngine(prepared_model / "onnx", OrtSettings(), EngineSettings())
    model = AutoModelForCausalLM.from_pretrained(prepared_model / "hf", dtype=torch.float32).eval()
    try:
        for title, text, question in PROMPTS:
            ids = engine.encoder.encode(build_messages(title, [Passage(0, text)], question))
            with torch.no_grad():
                out = model.generate(
                    torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2
                )
            expected = [t for t in out[0, len(ids) :].tolist() if t not in engine.decoder.spec.eos_token_ids]
            seq_result = engine.answer(text, title, question, SamplingParams(max_new_tokens=NEW_TOKENS))
            # engine.answer retrieves passages itself; the page is one passage, so the prompt is the same.
            assert seq_result.prompt_tokens == len(ids)
            assert seq_result.token_ids == expected, question
    finally:
        engine.close()
