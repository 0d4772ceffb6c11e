"""Provider choice: CUDA only where a GPU really is, with its arena options; CPU otherwise."""

import logging

import pytest

from flywheel_model.runtime import OrtSettings, choose_providers, cuda_device_count, cuda_provider_options


def test_cuda_options_carry_the_arena_limits() -> None:
    options = cuda_provider_options(
        OrtSettings(device_id=1, gpu_mem_limit=4 << 30, arena_extend_strategy="kSameAsRequested")
    )
    assert options == {
        "device_id": "1",
        "gpu_mem_limit": str(4 << 30),
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
        "do_copy_in_default_stream": "1",
    }
    assert "gpu_mem_limit" not in cuda_provider_options(OrtSettings())


@pytest.mark.skipif(cuda_device_count() > 0, reason="this machine has a GPU")
def test_without_a_gpu_cuda_falls_back_to_cpu_with_one_clear_line(caplog: pytest.LogCaptureFixture) -> None:
    assert choose_providers(OrtSettings(provider="auto")) == ["CPUExecutionProvider"]
    with caplog.at_level(logging.WARNING):
        assert choose_providers(OrtSettings(provider="cuda")) == ["CPUExecutionProvider"]
    assert len([r for r in caplog.records if "serving on CPU" in r.getMessage()]) == 1


def test_cpu_is_always_cpu() -> None:
    assert choose_providers(OrtSettings(provider="cpu")) == ["CPUExecutionProvider"]
