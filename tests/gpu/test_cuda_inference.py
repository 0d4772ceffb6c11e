"""The CUDA execution provider with an arena limit answers like the CPU (run where a GPU is)."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest

from flywheel_model.engine import AnswerEngine, EngineSettings
from flywheel_model.generation import SamplingParams
from flywheel_model.runtime import OrtSettings, cuda_device_count

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        cuda_device_count() == 0 or "CUDAExecutionProvider" not in ort.get_available_providers(),
        reason="needs a CUDA GPU and onnxruntime-gpu",
    ),
]

PAGE = "Apache Kafka was originally developed at LinkedIn and open-sourced in early 2011."
QUESTIONS = ["Where was Kafka developed?", "When was Kafka open-sourced?"]


def test_cuda_with_a_memory_limit_answers_like_the_cpu(onnx_model_dir: Path) -> None:
    cuda = AnswerEngine(
        onnx_model_dir,
        OrtSettings(provider="cuda", gpu_mem_limit=2 << 30, arena_extend_strategy="kSameAsRequested"),
        EngineSettings(),
    )
    cpu = AnswerEngine(onnx_model_dir, OrtSettings(provider="cpu"), EngineSettings())
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
