"""The CUDA execution provider with an arena limit answers like the CPU, with its cache bound to the
device and several sequences in a batch (run where a GPU is)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from flywheel_model.engine import AnswerEngine, EngineSettings
from flywheel_model.generation import BatchGenerator, SamplingParams
from flywheel_model.runtime import Decoder, OrtSettings, cuda_device_count

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        cuda_device_count() == 0 or "CUDAExecutionProvider" not in ort.get_available_providers(),
        reason="needs a CUDA GPU and onnxruntime-gpu",
    ),
]

PAGE = "Apache Kafka was originally developed at LinkedIn and open-sourced in early 2011."
QUESTIONS = ["Where was Kafka developed?", "When was Kafka open-sourced?"]
Generate = Callable[[BatchGenerator, list[list[int]], int], list[list[int]]]
# The limits the batched-decoding failure was seen with.
LIMITED = {"gpu_mem_limit": 2 << 30, "arena_extend_strategy": "kSameAsRequested"}


def test_cuda_with_a_memory_limit_answers_like_the_cpu(onnx_model_dir: Path) -> None:
    cuda = AnswerEngine(
        onnx_model_dir,
        OrtSettings(provider="cuda", **LIMITED),
        EngineSettings(answer_candidates=1),
    )
    # Greedy on both: CUDA decodes one row at a time unless ORT__CUDA_BATCHING, so without candidates.
    cpu = AnswerEngine(onnx_model_dir, OrtSettings(provider="cpu"), EngineSettings(answer_candidates=1))
    try:
        assert cuda.provider == "CUDAExecutionProvider"
        for question in QUESTIONS:
            params = SamplingParams(max_new_tokens=24)
            on_gpu = cuda.answer(PAGE, "Kafka", question, params)
            on_cpu = cpu.answer(PAGE, "Kafka", question, params)
            assert on_gpu.text == on_cpu.text, question
    finally:
        cuda.close()
        cpu.close()


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(3)
    # Different lengths, so sequences join and leave the batch at different steps.
    return [list(rng.integers(100, 40000, n)) for n in (300, 41, 470, 7, 128)]


def test_io_bound_decoding_on_cuda_equals_unbound(onnx_model_dir: Path, generate: Generate) -> None:
    outputs = []
    for io_binding in ("off", "on"):
        decoder = Decoder(onnx_model_dir, OrtSettings(provider="cuda", io_binding=io_binding, **LIMITED))
        assert decoder.provider == "CUDAExecutionProvider" and decoder.io_bound == (io_binding == "on")
        generator = BatchGenerator(decoder, max_batch=1)
        outputs.append(generate(generator, _prompts(), 24))
        generator.close()
    assert outputs[1] == outputs[0]


def test_batched_decoding_on_cuda_equals_one_at_a_time(onnx_model_dir: Path, generate: Generate) -> None:
    decoder = Decoder(onnx_model_dir, OrtSettings(provider="cuda", cuda_batching=True, **LIMITED))
    assert decoder.io_bound and decoder.batches
    one = BatchGenerator(decoder, max_batch=1)
    sequential = [generate(one, [p], 24)[0] for p in _prompts()]
    one.close()
    batched_generator = BatchGenerator(decoder, max_batch=16)
    batched = generate(batched_generator, _prompts(), 24)
    batched_generator.close()
    assert batched == sequential
