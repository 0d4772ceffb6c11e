"""LoRA fine-tuning: fp32 LoRA on CPU, QLoRA (bitsandbytes NF4, bf16 compute) on CUDA.

The loss is cross-entropy on the answer tokens only, and the output projection is applied to
those positions alone (a prompt of a few hundred tokens would otherwise cost a vocabulary-sized
logits tensor per token for nothing).
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flywheel_trainer.job.data import Tokenized
from flywheel_trainer.settings import HyperParameters

log = logging.getLogger(__name__)

# Files copied from the base model next to merged weights (tokenizer, chat template, generation).
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclass
class TrainResult:
    """What training did, for the candidate's lineage."""

    loss_curve: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    micro_batches: int = 0
    examples_seen: int = 0
    answer_tokens: int = 0
    total_tokens: int = 0
    seconds: float = 0.0
    # Summed odds-ratio loss and the preference pairs it was computed on (ORPO; 0 when off).
    preference_loss: float = 0.0
    preference_pairs: int = 0

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps else 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_for_training(hf_dir: Path, device: str, quantization: str, hyper: HyperParameters) -> Any:
    """The base model with LoRA adapters on the target projections (QLoRA when quantization is nf4)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    seed_everything(hyper.seed)  # the adapters' initial weights are drawn here
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if device == "cuda" else torch.float32
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True,
        )
        model = AutoModelForCausalLM.from_pretrained(
            hf_dir, quantization_config=quant, dtype=compute, device_map={"": device}
        )
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=hyper.gradient_checkpointing
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        model = model.to(torch.device(device))  # type: ignore[arg-type]
        if hyper.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    model.config.use_cache = False
    layers = model.config.num_hidden_layers
    top = min(hyper.lora_layers, layers) if hyper.lora_layers else layers
    config = LoraConfig(
        r=hyper.lora_r,
        lora_alpha=hyper.lora_alpha,
        lora_dropout=hyper.lora_dropout,
        target_modules=list(hyper.target_modules),
        layers_to_transform=None if top == layers else list(range(layers - top, layers)),
        bias="none",
        task_type="CAUSAL_LM",
    )
    adapted = get_peft_model(model, config)
    left_out = linear_layers_left_out(adapted)
    if left_out:
        log.warning(
            "linear layers without adapters (hyper.target_modules names none of them): %s",
            ", ".join(left_out),
        )
    return adapted


def linear_layers_left_out(model: Any) -> list[str]:
    """The kinds of the decoder's linear layers (their names' last part) that got no adapter, the
    output projection aside: a model naming its projections otherwise trains only part of itself."""
    body, head = _parts(model)
    adapted, linear = set(), set()
    for name, module in body.named_modules():
        kind = name.rsplit(".", 1)[-1]
        # An adapter's own layers (lora_A/lora_B) and the layer it wraps are not the model's.
        own = "lora_" not in name and kind != "base_layer"
        if hasattr(module, "lora_A"):
            adapted.add(kind)
        elif own and isinstance(module, torch.nn.Linear) and module is not head:
            linear.add(kind)
    return sorted(linear - adapted)


def _parts(model: Any) -> tuple[Any, Any]:
    """The decoder body and the output projection of a (peft-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.get_output_embeddings()


def _micro_batches(items: Sequence[Tokenized], size: int, order: list[int]) -> list[list[Tokenized]]:
    return [[items[i] for i in order[s : s + size]] for s in range(0, len(order), size)]


def _answer_token_losses(
    model: Any, sequences: Sequence[tuple[list[int], int]], pad_id: int, device: str, prompt_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each answer token of right-padded sequences (token ids, prompt length), and
    the row each token belongs to. Without `prompt_grad` the positions before the first predicted
    answer token run first, without gradients, and the rest reads their KV cache as a constant."""
    body, head = _parts(model)
    width = max(len(ids) for ids, _ in sequences)
    batch = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for r, (input_ids, prompt_len) in enumerate(sequences):
        n = len(input_ids)
        batch[r, :n] = torch.tensor(input_ids)
        mask[r, :n] = 1
        # Position p predicts token p + 1: the answer's tokens are predicted from prompt_len - 1 on.
        positions = range(prompt_len - 1, n - 1)
        rows += [r] * len(positions)
        cols += list(positions)
        targets += input_ids[prompt_len:]
    batch, mask = batch.to(device), mask.to(device)
    split = 0 if prompt_grad else min(prompt_len for _, prompt_len in sequences) - 1
    cache = None
    if split > 0:
        with torch.no_grad():
            cache = body(input_ids=batch[:, :split], attention_mask=mask[:, :split], use_cache=True).cache
    hidden = body(input_ids=batch[:, split:], attention_mask=mask, cache=cache).last_hidden_state
    row_index = torch.tensor(rows, device=device)
    picked = hidden[row_index, torch.tensor(cols, device=device) - split]
    logits = head(picked).float()
    losses = torch.nn.functional.cross_entropy(logits, torch.tensor(targets, device=device), reduction="none")
    return losses, row_index


def _mean_per_row(values: torch.Tensor, rows: torch.Tensor, count: int) -> torch.Tensor:
    sums = torch.zeros(count, device=values.device).index_add(0, rows, values)
    sizes = torch.zeros(count, device=values.device).index_add(0, rows, torch.ones_like(values))
    return sums / sizes


def odds_ratio_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor) -> torch.Tensor:
    """ORPO's preference term per pair: -log sigmoid(log odds(chosen) - log odds(rejected)), where a
    sequence's odds come from its mean answer-token log-probability (Hong et al., 2024)."""

    def log_odds(logp: torch.Tensor) -> torch.Tensor:
        logp = logp.clamp(max=-1e-6)
        return logp - torch.log1p(-torch.exp(logp))

    return -torch.nn.functional.logsigmoid(log_odds(chosen_logp) - log_odds(rejected_logp))


@dataclass
class BatchLosses:
    """A micro-batch's summed answer-token loss, and its summed odds-ratio loss over its pairs."""

    answer_sum: torch.Tensor
    answer_tokens: int
    odds_sum: torch.Tensor
    pairs: int


def batch_losses(
    model: Any,
    batch: Sequence[Tokenized],
    pad_id: int,
    device: str,
    *,
    preference: bool,
    prompt_grad: bool = True,
) -> BatchLosses:
    """The supervised loss of a micro-batch and, with `preference`, the odds-ratio loss of the examples
    that have a rejected answer, in one forward pass (the rejected answers ride along as extra rows)."""
    pairs = [i for i, t in enumerate(batch) if t.rejected_ids] if preference else []
    sequences = [(t.input_ids, t.prompt_len) for t in batch]
    sequences += [(batch[i].rejected_ids, batch[i].prompt_len) for i in pairs]
    losses, rows = _answer_token_losses(model, sequences, pad_id, device, prompt_grad)
    chosen = rows < len(batch)
    answer_sum, answer_tokens = losses[chosen].sum(), int(chosen.sum())
    if not pairs:
        return BatchLosses(answer_sum, answer_tokens, torch.zeros((), device=device), 0)
    logp = -_mean_per_row(losses, rows, len(sequences))
    odds = odds_ratio_loss(logp[torch.tensor(pairs, device=device)], logp[len(batch) :])
    return BatchLosses(answer_sum, answer_tokens, odds.sum(), len(pairs))


def answer_loss_sum(
    model: Any, batch: Sequence[Tokenized], pad_id: int, device: str
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the answer tokens of a micro-batch, and how many there were."""
    losses = batch_losses(model, batch, pad_id, device, preference=False)
    return losses.answer_sum, losses.answer_tokens


def train(
    model: Any,
    examples: Sequence[Tokenized],
    hyper: HyperParameters,
    *,
    device: str,
    pad_id: int,
    on_step: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Trains the adapter: AdamW, linear warmup and decay, gradient accumulation, clipped gradients.

    Each optimizer step averages the loss over the answer tokens of its micro-batches.
    """
    if not examples:
        raise ValueError("no examples to train on")
    # The examples come in the order their feedback arrived, which visitors' timing decides: put
    # them in an order of their content first, so that the seeded shuffle, and so the model, depends
    # only on what they are.
    examples = sorted(examples, key=lambda t: (t.input_ids, t.prompt_len, t.rejected_ids))
    seed_everything(hyper.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hyper.learning_rate, weight_decay=hyper.weight_decay)
    micro_per_epoch = math.ceil(len(examples) / hyper.micro_batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / hyper.gradient_accumulation)
    total_steps = steps_per_epoch * hyper.epochs
    if hyper.max_steps:
        total_steps = min(total_steps, hyper.max_steps)
    warmup = int(total_steps * hyper.warmup_ratio)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = random.Random(hyper.seed)
    result = TrainResult()
    started = time.perf_counter()
    model.train()
    for _epoch in range(hyper.epochs):
        if result.steps >= total_steps:
            break
        order = list(range(len(examples)))
        generator.shuffle(order)
        micro = _micro_batches(examples, hyper.micro_batch_size, order)
        epoch_loss, epoch_tokens = 0.0, 0
        for s in range(0, len(micro), hyper.gradient_accumulation):
            if result.steps >= total_steps:
                break
            group = micro[s : s + hyper.gradient_accumulation]
            tokens = sum(t.answer_tokens for mb in group for t in mb)
            pairs = sum(bool(t.rejected_ids) for mb in group for t in mb) if hyper.preference_weight else 0
            step_loss = 0.0
            for mb in group:
                losses = batch_losses(
                    model, mb, pad_id, device, preference=bool(pairs), prompt_grad=hyper.prompt_grad
                )
                loss = losses.answer_sum / tokens
                if losses.pairs:
                    loss = loss + hyper.preference_weight * losses.odds_sum / pairs
                    result.preference_loss += float(losses.odds_sum.detach())
                    result.preference_pairs += losses.pairs
                loss.backward()
                step_loss += float(losses.answer_sum.detach())
                result.micro_batches += 1
                result.examples_seen += len(mb)
                result.total_tokens += sum(len(t.input_ids) for t in mb)
            torch.nn.utils.clip_grad_norm_(params, hyper.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.steps += 1
            result.answer_tokens += tokens
            result.loss_curve.append(round(step_loss / tokens, 5))
            epoch_loss += step_loss
            epoch_tokens += tokens
            if on_step is not None:
                on_step(result.steps, total_steps, step_loss / tokens)
        if epoch_tokens:
            result.epoch_losses.append(round(epoch_loss / epoch_tokens, 5))
    result.seconds = time.perf_counter() - started
    return result


def merge(base_hf: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Merges the adapter into fresh fp32 base weights (also after QLoRA) and saves a HF folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    for name in SIDE_FILES:
        if (base_hf / name).is_file():
            shutil.copyfile(base_hf / name, out_dir / name)
    return out_dir
