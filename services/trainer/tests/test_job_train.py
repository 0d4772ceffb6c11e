"""The training job's core on a tiny random Llama: answer-only loss, training, merging, greedy decoding."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from flywheel_trainer.job import train  # noqa: E402
from flywheel_trainer.job.data import Tokenized  # noqa: E402
from flywheel_trainer.job.verify import torch_greedy  # noqa: E402
from flywheel_trainer.settings import HyperParameters  # noqa: E402

HYPER = HyperParameters(
    lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=5e-3, epochs=4, gradient_accumulation=2
)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with random weights, saved as a Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("tiny") / "hf"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


EXAMPLES = [
    Tokenized("a", [5, 6, 7, 8, 9, 10, 11, 2], prompt_len=5),
    Tokenized("b", [12, 13, 14, 15, 16, 17, 2], prompt_len=4),
    Tokenized("c", [20, 21, 22, 23, 24, 25, 26, 27, 2], prompt_len=6),
]


def test_answer_loss_is_the_masked_causal_lm_loss(tiny_hf: Path) -> None:
    model = train.load_for_training(tiny_hf, "cpu", "none", HYPER)
    model.eval()
    loss_sum, n = train.answer_loss_sum(model, EXAMPLES[:2], pad_id=0, device="cpu")
    expected = 0.0
    for t in EXAMPLES[:2]:
        ids = torch.tensor([t.input_ids])
        labels = ids.clone()
        labels[0, : t.prompt_len] = -100
        expected += float(model(input_ids=ids, labels=labels).loss) * t.answer_tokens
    assert n == sum(t.answer_tokens for t in EXAMPLES[:2])
    assert float(loss_sum) == pytest.approx(expected, rel=1e-4)


def test_a_prompt_without_gradients_gives_the_same_loss_other_gradients_and_still_trains(
    tiny_hf: Path,
) -> None:
    grads = []
    for prompt_grad in (True, False):
        model = train.load_for_training(tiny_hf, "cpu", "none", HYPER)
        model.eval()
        # Prompts of 5, 4 and 6 tokens, right-padded: the cached prefix ends before the shortest.
        losses = train.batch_losses(model, EXAMPLES, 0, "cpu", preference=False, prompt_grad=prompt_grad)
        losses.answer_sum.backward()
        grads.append(
            (
                float(losses.answer_sum),
                {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad},
            )
        )
    (full_loss, full), (cached_loss, cached) = grads
    assert cached_loss == pytest.approx(full_loss, rel=1e-5)
    assert all(g.abs().sum() > 0 for name, g in cached.items() if "lora_B" in name)
    assert any(not torch.allclose(full[name], cached[name]) for name in full)
    hyper = HYPER.model_copy(update={"prompt_grad": False})
    result = train.train(
        train.load_for_training(tiny_hf, "cpu", "none", hyper), EXAMPLES, hyper, device="cpu", pad_id=0
    )
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    with pytest.raises(ValueError, match="checkpointing"):
        HyperParameters(prompt_grad=False, gradient_checkpointing=True)


def test_training_lowers_the_loss_and_is_seeded(tiny_hf: Path) -> None:
    runs = []
    for _ in range(2):
        model = train.load_for_training(tiny_hf, "cpu", "none", HYPER)
        runs.append(train.train(model, EXAMPLES, HYPER, device="cpu", pad_id=0))
    first = runs[0]
    assert first.steps == 8  # 2 optimizer steps per epoch (3 examples, accumulation 2), 4 epochs
    assert first.examples_seen == 12
    assert first.epoch_losses[-1] < first.epoch_losses[0]
    assert runs[1].loss_curve == first.loss_curve
    # The order the examples arrive in does not change what is trained.
    model = train.load_for_training(tiny_hf, "cpu", "none", HYPER)
    assert train.train(model, EXAMPLES[::-1], HYPER, device="cpu", pad_id=0).loss_curve == first.loss_curve


def test_max_steps_caps_training(tiny_hf: Path) -> None:
    model = train.load_for_training(tiny_hf, "cpu", "none", HYPER)
    capped = HYPER.model_copy(update={"max_steps": 3})
    assert train.train(model, EXAMPLES, capped, device="cpu", pad_id=0).steps == 3


def test_merged_model_answers_like_the_adapter(tiny_hf: Path, tmp_path: Path) -> None:
    model = train.load_for_training(tiny_hf, "cpu", "none", HYPER)
    train.train(model, EXAMPLES, HYPER, device="cpu", pad_id=0)
    model.save_pretrained(tmp_path / "adapter")
    merged = train.merge(tiny_hf, tmp_path / "adapter", tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    model.eval()
    ids = torch.tensor([EXAMPLES[0].input_ids])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-4)
    tokens, gaps = torch_greedy(reloaded, EXAMPLES[0].input_ids[:5], max_new_tokens=6, eos_ids=(2,))
    assert len(gaps) >= len(tokens) and all(g >= 0 for g in gaps)


def test_lora_layers_adapts_only_the_top_layers(tiny_hf: Path) -> None:
    model = train.load_for_training(tiny_hf, "cpu", "none", HYPER.model_copy(update={"lora_layers": 1}))
    adapted = {n.split(".layers.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"1"}
    result = train.train(model, EXAMPLES, HYPER, device="cpu", pad_id=0)
    assert result.epoch_losses[-1] < result.epoch_losses[0]


def test_odds_ratio_loss_is_log_two_for_equal_answers_and_falls_as_chosen_wins() -> None:
    same = train.odds_ratio_loss(torch.tensor([-1.0]), torch.tensor([-1.0]))
    assert float(same) == pytest.approx(float(torch.log(torch.tensor(2.0))))
    better = train.odds_ratio_loss(torch.tensor([-0.2]), torch.tensor([-3.0]))
    worse = train.odds_ratio_loss(torch.tensor([-3.0]), torch.tensor([-0.2]))
    assert float(better) < float(same) < float(worse)


def _margin(model: object, examples: list[Tokenized]) -> float:
    """Mean answer log-probability of the chosen answers minus that of the rejected ones."""
    chosen, n = train.answer_loss_sum(model, examples, pad_id=0, device="cpu")
    rejected = [Tokenized(t.example_id, t.rejected_ids, t.prompt_len) for t in examples]
    rejected_sum, m = train.answer_loss_sum(model, rejected, pad_id=0, device="cpu")
    return float(rejected_sum) / m - float(chosen) / n


def test_preference_weight_pushes_the_chosen_answer_above_the_rejected_one(tiny_hf: Path) -> None:
    pairs = [
        Tokenized("a", [5, 6, 7, 8, 9, 10, 11, 2], 5, rejected_ids=[5, 6, 7, 8, 9, 30, 31, 2]),
        Tokenized("b", [12, 13, 14, 15, 16, 17, 2], 4, rejected_ids=[12, 13, 14, 15, 40, 41, 2]),
    ]
    margins = {}
    for weight in (0.0, 2.0):
        hyper = HYPER.model_copy(update={"preference_weight": weight})
        model = train.load_for_training(tiny_hf, "cpu", "none", hyper)
        result = train.train(model, pairs, hyper, device="cpu", pad_id=0)
        assert result.preference_pairs == (8 if weight else 0)  # both pairs in each of 4 epochs
        model.eval()
        with torch.no_grad():
            margins[weight] = _margin(model, pairs)
    assert margins[2.0] > margins[0.0]


@pytest.mark.parametrize(
    ("parent", "candidate"), [("gguf", "gguf"), ("gguf_a8", "gguf_a8"), ("fp32", "fp32"), ("int4", "int4")]
)
def test_candidates_keep_the_parents_export_and_gguf_blocks_stay_exact(
    tmp_path: Path, parent: str, candidate: str
) -> None:
    from flywheel_common.files import file_sha256
    from flywheel_common.registry import ModelVersion
    from flywheel_trainer.job.run import export_plan_of

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF blocks")
    source = {"kind": "gguf", "path": str(gguf), "sha256": file_sha256(gguf)}
    base = ModelVersion("v1", tmp_path, {"prepared": {"source": source, "export": {"precision": parent}}})
    plan = export_plan_of(base)
    assert plan.options.precision == candidate
    # Exported and verified exactly (fp32 activations); gguf_a8 switches to 8-bit ones afterwards.
    assert plan.verified_options.precision == ("gguf" if candidate == "gguf_a8" else candidate)
    if candidate in ("fp32", "int4"):
        # No blocks to hand on, from a GGUF or a Hugging Face folder, and nothing to explain (fp32
        # rescores its output projection whatever its source).
        assert plan.gguf is None and plan.record() == {"precision": candidate, "provider": "cpu"}
        hf_base = ModelVersion(
            "v1", tmp_path, {"prepared": {"source": {"kind": "hf"}, "export": {"precision": parent}}}
        )
        assert export_plan_of(hf_base) == plan
        return
    # A candidate's own candidates find the GGUF in its manifest's export record.
    assert plan.gguf == {"path": str(gguf), "sha256": source["sha256"]}
    child = ModelVersion("v2", tmp_path, {"export": plan.record()})
    assert export_plan_of(child) == plan
    # On a machine without the GGUF (or with another file there), candidates are fp32, and say why.
    gguf.write_bytes(b"other bytes")
    fallback = export_plan_of(child)
    assert fallback.options.precision == "fp32" and fallback.gguf is None
    assert str(gguf) in fallback.record()["note"]
    gguf.unlink()
    assert export_plan_of(base).options.precision == "fp32"


def test_one_pass_gives_the_supervised_loss_and_the_preference_loss_of_separate_passes(tiny_hf: Path) -> None:
    batch = [
        Tokenized("a", [5, 6, 7, 8, 9, 10, 11, 2], 5, rejected_ids=[5, 6, 7, 8, 9, 30, 2]),
        Tokenized("b", [12, 13, 14, 15, 16, 17, 2], 4),
    ]
    model = train.load_for_training(tiny_hf, "cpu", "none", HYPER)
    model.eval()
    with torch.no_grad():
        losses = train.batch_losses(model, batch, pad_id=0, device="cpu", preference=True)
        answer_sum, n = train.answer_loss_sum(model, batch, pad_id=0, device="cpu")
        chosen, c = train.answer_loss_sum(model, batch[:1], pad_id=0, device="cpu")
        rejected = [Tokenized("a", batch[0].rejected_ids, 5)]
        rejected_sum, r = train.answer_loss_sum(model, rejected, pad_id=0, device="cpu")
        odds = train.odds_ratio_loss(-chosen.reshape(1) / c, -rejected_sum.reshape(1) / r)
        without = train.batch_losses(model, batch, pad_id=0, device="cpu", preference=False)
    assert (losses.answer_tokens, losses.pairs) == (n, 1)
    assert float(losses.answer_sum) == pytest.approx(float(answer_sum), rel=1e-5)
    assert float(losses.odds_sum) == pytest.approx(float(odds.sum()), rel=1e-5)
    assert (without.pairs, float(without.odds_sum)) == (0, 0.0)


def test_every_projection_is_adapted_in_fused_and_separate_layouts(tiny_hf: Path, tmp_path: Path) -> None:
    # Phi-3 fuses q/k/v and gate/up: with Llama's names only its o_proj and down_proj were adapted,
    # and the job said nothing.
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    Phi3ForCausalLM(config).save_pretrained(tmp_path / "phi3")
    model = train.load_for_training(tmp_path / "phi3", "cpu", "none", HYPER)
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert train.linear_layers_left_out(model) == []
    llama = train.load_for_training(tiny_hf, "cpu", "none", HYPER)
    assert train.linear_layers_left_out(llama) == []
    narrow = HYPER.model_copy(update={"target_modules": ["o_proj"]})
    partial = train.load_for_training(tmp_path / "phi3", "cpu", "none", narrow)
    assert train.linear_layers_left_out(partial) == ["down_proj", "gate_up_proj", "qkv_proj"]
