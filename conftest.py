"""Fixtures shared by every test tier: the prepared base model (made once, cached under .cache/), and
greedy generation of several prompts at once through a batch generator."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

Generate = Callable[[Any, list[list[int]], int | list[int]], list[list[int]]]


@pytest.fixture(scope="session")
def prepared_model() -> Path:
    """The prepared SmolLM2 folder (`hf/`, `onnx/`, manifest), prepared on first use."""
    from flywheel_model.prepare import ExportOptions, ensure_prepared

    return ensure_prepared(None, ExportOptions(), None, force=False)


@pytest.fixture(scope="session")
def onnx_model_dir(prepared_model: Path) -> Path:
    return prepared_model / "onnx"


@pytest.fixture(scope="session")
def idle_launcher() -> Any:
    """A job launcher whose jobs never run (each ends at once, "never"): for tests of the trainer
    service's API and data, not its training."""
    from flywheel_trainer.launchers import JobLauncher, JobSpec, Outcome

    class IdleLauncher(JobLauncher):
        name = "idle"

        def launch(self, spec: JobSpec) -> str:
            return spec.job_id

        def wait(self, handle: str) -> Outcome:
            return Outcome(False, "never")

        def stop(self, handle: str) -> None:
            pass

    return IdleLauncher()


def _generate(generator: Any, prompts: list[list[int]], max_new_tokens: int | list[int]) -> list[list[int]]:
    """Submits every prompt to a BatchGenerator at once; each one's greedy tokens, in order.
    `max_new_tokens`: one bound for all, or one per prompt."""
    from flywheel_model.generation import SamplingParams, Sequence

    results: list[list[int]] = [[] for _ in prompts]
    finished = threading.Semaphore(0)
    bounds = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    for i, (prompt, bound) in enumerate(zip(prompts, bounds, strict=True)):
        generator.submit(
            Sequence(
                prompt,
                SamplingParams(max_new_tokens=bound),
                on_token=results[i].append,
                on_finish=lambda reason, error: finished.release(),
            )
        )
    for _ in prompts:
        assert finished.acquire(timeout=300)
    return results


@pytest.fixture(scope="session")
def generate() -> Generate:
    return _generate
