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


@pytest.mark.integration
@pytest.mark.slow
def test_q4_1_export_answers_token_for_token_like_fp32(prepared_model: Path) -> None:
    """The GGUF's own blocks (4 and 8 bits, fp32 activations) give fp32's greedy answers."""
    from flywheel_model.prepare import ExportOptions, ensure_prepared, read_manifest

    q4_1 = ensure_prepared(None, ExportOptions("q4_1"), None, force=False)
    ops = read_manifest(q4_1)["export"]["ops"]
    # Every projection and the tied output matrix are blocks: the only plain MatMuls left are the
    # small block-offset products added beside each MatMulNBits.
    assert ops["MatMulNBits"] > ops["MatMul"] > 0
    weights = sum(p.stat().st_size for p in (q4_1 / "onnx").glob("model.onnx*"))
    fp32_weights = sum(p.stat().st_size for p in (prepared_model / "onnx").glob("model.onnx*"))
    assert weights < 0.3 * fp32_weights
    fp32 = AnswerEngine(prepared_model / "onnx", OrtSettings(provider="cpu"), EngineSettings())
    blocks = AnswerEngine(q4_1 / "onnx", OrtSettings(provider="cpu"), EngineSettings())
    try:
        for title, text, question in PROMPTS:
            params = SamplingParams(max_new_tokens=NEW_TOKENS)
            expected = fp32.answer(text, title, question, params).token_ids
            assert blocks.answer(text, title, question, params).token_ids == expected, question
    finally:
        fp32.close()
        blocks.close()
