"""One QLoRA step on CUDA: the base in bitsandbytes 4-bit NF4, bf16 compute, LoRA adapters learn."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available"),
]


def test_one_qlora_step_on_the_prepared_model(prepared_model: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from flywheel_trainer.job import train
    from flywheel_trainer.job.data import Tokenized
    from flywheel_trainer.settings import HyperParameters

    hyper = HyperParameters(gradient_accumulation=2, max_steps=1)
    model = train.load_for_training(prepared_model / "hf", "cuda", "nf4", hyper)
    quantized = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert quantized, "no 4-bit layers: the base was not quantized"
    assert quantized[0].weight.quant_type == "nf4"
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    prompt = list(range(1000, 1300))
    examples = [Tokenized(f"e{i}", [*prompt, 500 + i, 600 + i, 2], prompt_len=len(prompt)) for i in range(2)]
    torch.cuda.reset_peak_memory_stats()
    result = train.train(model, examples, hyper, device="cuda", pad_id=2)
    assert result.steps == 1 and result.loss_curve[0] > 0
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert changed, "no adapter weight moved"
    print(
        f"QLoRA step on {torch.cuda.get_device_name(0)}: {result.seconds:.2f} s, "
        f"loss {result.loss_curve[0]:.3f}, peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    )
