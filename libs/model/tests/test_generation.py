"""Sampling, batch cache bookkeeping, and generation on the real ONNX model."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from flywheel_model.generation import BatchGenerator, Sampler, SamplingParams, Sequence
from flywheel_model.runtime import Decoder, OrtSettings, select_rows, stack_kv


def test_greedy_sampler_takes_the_argmax() -> None:
    assert Sampler(SamplingParams())(np.array([0.1, 3.0, -1.0])) == 1


def test_seeded_sampling_is_reproducible_and_top_p_truncates() -> None:
    logits = np.log(np.array([0.6, 0.3, 0.05, 0.05]))
    params = SamplingParams(temperature=1.0, top_p=0.5, seed=7)
    draws = [Sampler(params)(logits) for _ in range(5)]
    assert draws == [draws[0]] * 5  # a fresh sampler with the same seed draws the same
    sampler = Sampler(params)
    assert {sampler(logits) for _ in range(50)} == {0}  # top-p 0.5 keeps only the 0.6 token


def test_stack_and_select_rows_keep_each_sequence_intact() -> None:
    a = {"k": np.arange(1 * 2 * 3 * 4, dtype=np.float32).reshape(1, 2, 3, 4)}
    b = {"k": np.ones((1, 2, 5, 4), np.float32)}
    stacked = stack_kv([(a, 3), (b, 5)])
    assert stacked["k"].shape == (2, 2, 5, 4)
    np.testing.assert_array_equal(stacked["k"][0, :, :3], a["k"][0])
    assert not stacked["k"][0, :, 3:].any()
    kept = select_rows(stacked, [0], 3)
    np.testing.assert_array_equal(kept["k"], a["k"])


def generate(generator: BatchGenerator, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    results: list[list[int]] = [[] for _ in prompts]
    finished = threading.Semaphore(0)
    for i, prompt in enumerate(prompts):
        generator.submit(
            Sequence(
                prompt,
                SamplingParams(max_new_tokens=max_new_tokens),
                on_token=results[i].append,
                on_finish=lambda reason, error: finished.release(),
            )
        )
    for _ in prompts:
        assert finished.acquire(timeout=300)
    return results


@pytest.mark.integration
def test_batched_decoding_equals_one_at_a_time(onnx_model_dir: Path) -> None:
    decoder = Decoder(onnx_model_dir, OrtSettings())
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(100, 40000, n)) for n in (30, 75, 12)]
    one = BatchGenerator(decoder, max_batch=1)
    sequential = [generate(one, [p], 12)[0] for p in prompts]
    one.close()
    batched_generator = BatchGenerator(decoder, max_batch=8)
    batched = generate(batched_generator, prompts, 12)
    batched_generator.close()
    assert batched == sequential
    assert all(len(tokens) == 12 for tokens in batched)
