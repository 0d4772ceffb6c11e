"""The export check: greedy answers from the exported ONNX model (through the serving engine) must
equal greedy answers from the merged PyTorch model on the same prompts."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class PromptCheck:
    """One prompt: both token sequences, and where (if anywhere) they part."""

    torch_tokens: list[int]
    onnx_tokens: list[int]
    diverged_at: int | None = None
    gap_at_divergence: float | None = None

    @property
    def equal(self) -> bool:
        return self.diverged_at is None


@dataclass
class VerifyResult:
    """All prompts checked; `ok` unless some divergence was not a tie."""

    checks: list[PromptCheck] = field(default_factory=list)
    tie_tolerance: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c.equal or (c.gap_at_divergence or 0.0) < self.tie_tolerance for c in self.checks)

    def summary(self) -> dict[str, Any]:
        return {
            "prompts": len(self.checks),
            "identical": sum(c.equal for c in self.checks),
            "ties": sum(
                (not c.equal) and (c.gap_at_divergence or 0.0) < self.tie_tolerance for c in self.checks
            ),
            "tokens_compared": sum(len(c.torch_tokens) for c in self.checks),
            "tie_tolerance": self.tie_tolerance,
        }


@torch.no_grad()
def torch_greedy(
    model: Any, prompt_ids: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int]
) -> tuple[list[int], list[float]]:
    """Greedy tokens (stop token excluded) and, per step, the gap between the two best logits."""
    model.eval()
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([list(prompt_ids)], device=device), use_cache=True)
    tokens: list[int] = []
    gaps: list[float] = []
    for _ in range(max_new_tokens):
        logits = out.logits[0, -1].float()
        top = torch.topk(logits, 2)
        gaps.append(float(top.values[0] - top.values[1]))
        token = int(top.indices[0])
        if token in eos_ids:
            break
        tokens.append(token)
        out = model(
            input_ids=torch.tensor([[token]], device=device),
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return tokens, gaps


def onnx_greedy(engine: Any, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from the ONNX engine (its generator stops at the stop token, excluded)."""
    from flywheel_model.generation import SamplingParams
    from flywheel_model.generation import Sequence as GenSequence

    tokens: list[int] = []
    done = threading.Event()
    errors: list[BaseException] = []

    def on_finish(_reason: str, error: BaseException | None) -> None:
        if error is not None:
            errors.append(error)
        done.set()

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    engine.generator.submit(GenSequence(list(prompt_ids), params, tokens.append, on_finish))
    done.wait()
    if errors:
        raise errors[0]
    return tokens


def compare(
    model: Any,
    onnx_dir: Path,
    prompts: Sequence[list[dict[str, str]]],
    *,
    max_new_tokens: int,
    tie_tolerance: float,
) -> VerifyResult:
    """Runs both models greedily on each prompt (chat messages) and compares the tokens."""
    from flywheel_model.engine import AnswerEngine, EngineSettings
    from flywheel_model.runtime import OrtSettings

    engine = AnswerEngine(onnx_dir, OrtSettings(provider="auto"), EngineSettings(max_batch=1))
    try:
        eos_ids = engine.stop_token_ids
        result = VerifyResult(tie_tolerance=tie_tolerance)
        for messages in prompts:
            ids = engine.encoder.encode(messages)
            expected, gaps = torch_greedy(model, ids, max_new_tokens, eos_ids)
            got = onnx_greedy(engine, ids, max_new_tokens)
            check = PromptCheck(expected, got)
            for i in range(max(len(expected), len(got))):
                if i >= len(expected) or i >= len(got) or expected[i] != got[i]:
                    check.diverged_at = i
                    check.gap_at_divergence = gaps[i] if i < len(gaps) else float("inf")
                    break
            result.checks.append(check)
        return result
    finally:
        engine.close()
