"""`prepare` takes any Hugging Face causal-LM folder and exports fp16 for CUDA, with a manifest."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from flywheel_common.files import file_sha256
from flywheel_model.output_projection import RESCORED_PROJECTION
from flywheel_model.prepare import (
    ExportOptions,
    Precision,
    ensure_prepared,
    export_onnx,
    prepare,
    read_manifest,
)


@pytest.mark.integration
@pytest.mark.slow
def test_hf_folder_to_fp16_cuda_export(prepared_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp16"
    prepare(
        out,
        source=prepared_model / "hf",
        options=ExportOptions(precision="fp16", provider="cuda"),
        cache_dir=tmp_path / "cache",
    )
    manifest = read_manifest(out)
    assert manifest["source"]["kind"] == "hf"
    assert manifest["export"]["precision"] == "fp16" and manifest["export"]["io_dtype"] == "float16"
    assert manifest["export"]["opset"] >= 17
    assert manifest["export"]["output_projection"] == "fp16" and not manifest["export"]["ops"]["If"]
    for name, digest in manifest["onnx_files"].items():
        assert file_sha256(out / "onnx" / name) == digest
    graph = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False).graph
    past = next(i for i in graph.input if i.name == "past_key_values.0.key")
    assert past.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert not (tmp_path / "fp16.partial").exists()


@pytest.mark.integration
def test_the_fp32_export_rescores_its_output_projection(
    prepared_model: Path,
) -> None:
    export = read_manifest(prepared_model)["export"]
    assert export["output_projection"] == RESCORED_PROJECTION
    assert export["ops"]["MatMulNBits"] == 1 and export["ops"]["If"] == 0
    said: list[str] = []
    assert (
        ensure_prepared(None, ExportOptions(), prepared_model, force=False, echo=said.append)
        == prepared_model
    )
    assert said == [f"model already prepared in {prepared_model}"]


def test_a_source_that_is_not_a_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither"):
        prepare(tmp_path / "out", source=tmp_path, options=ExportOptions(), cache_dir=tmp_path / "c")
    assert not (tmp_path / "out.partial").exists()


def test_an_architecture_the_builder_lacks_is_named_and_leaves_nothing_behind(
    prepared_model: Path, tmp_path: Path
) -> None:
    # The builder said "… model is not currently supported", naming the staging folder, and the
    # staging copy of the weights stayed behind.
    from transformers import GPT2Config, GPT2LMHeadModel

    source = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=49152)).save_pretrained(source)
    with pytest.raises(ValueError, match="no tokenizer"):
        prepare(tmp_path / "out", source=source, options=ExportOptions(), cache_dir=tmp_path / "c")
    (source / "tokenizer.json").write_bytes((prepared_model / "hf" / "tokenizer.json").read_bytes())
    with pytest.raises(RuntimeError) as failed:
        prepare(tmp_path / "out", source=source, options=ExportOptions(), cache_dir=tmp_path / "c")
    first_line = str(failed.value).splitlines()[0]
    assert "architecture GPT2LMHeadModel is not supported by onnxruntime-genai" in first_line
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out").exists()


def test_a_failed_export_says_the_exporters_error_first(tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    with pytest.raises(RuntimeError) as failed:
        export_onnx(tmp_path / "hf", tmp_path / "onnx", ExportOptions(), cache_dir=tmp_path / "c")
    first_line = str(failed.value).splitlines()[0]
    log = (tmp_path / "onnx.export.log").read_text().strip().splitlines()
    assert first_line.startswith("ONNX export failed (1): ") and log[-1].strip()[:300] in first_line


def test_fp32_for_cuda_is_refused_before_an_invalid_model_is_built() -> None:
    with pytest.raises(ValueError, match="fp16"):
        ExportOptions(precision="fp32", provider="cuda")
    assert ExportOptions(precision="fp16", provider="cuda").builder_args()[:4] == ["-p", "fp16", "-e", "cuda"]


@pytest.mark.parametrize(("precision", "accuracy_level"), [("gguf", 1), ("gguf_a8", 4)])
def test_gguf_blocks_need_a_gguf_source_and_the_cpu(
    tmp_path: Path, precision: Precision, accuracy_level: int
) -> None:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"not a \.gguf"):
        options = ExportOptions(precision)
        prepare(tmp_path / "out", source=tmp_path / "hf", options=options, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="CPU only"):
        ExportOptions(precision=precision, provider="cuda")
    # Built on the fp32 graph, re-encoded afterwards; gguf_a8 quantizes the activations to 8 bits.
    assert ExportOptions(precision=precision).builder_args()[:2] == ["-p", "fp32"]
    assert ExportOptions(precision=precision).accuracy_level == accuracy_level


def test_the_default_precision_follows_the_provider() -> None:
    from flywheel_model.prepare import default_precision

    assert default_precision() == "fp32"
    assert default_precision("cuda") == "fp16"  # fp32 for CUDA makes an invalid model (above)


def test_gemma3_rope_per_layer_type_is_flattened_exactly_for_the_builder() -> None:
    from transformers import Gemma3TextConfig

    from flywheel_model.onnx_build import flatten_layer_rope

    config = Gemma3TextConfig()
    # Transformers 5 describes the rope per layer type; the builder reads rope_theta (global layers)
    # and rope_local_base_freq (sliding-window layers).
    local = config.rope_parameters["sliding_attention"]["rope_theta"]
    global_ = config.rope_parameters["full_attention"]["rope_theta"]
    assert local != global_
    assert flatten_layer_rope(config)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": global_}
    assert (config.rope_theta, config.rope_local_base_freq) == (global_, local)
    assert not flatten_layer_rope(config)  # already flat: left as it is


def test_a_scaled_rope_per_layer_type_is_refused_not_exported_inexactly() -> None:
    from transformers import Gemma3TextConfig

    from flywheel_model.onnx_build import flatten_layer_rope

    config = Gemma3TextConfig()
    config.rope_parameters["full_attention"] = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    with pytest.raises(ValueError, match="plain rotary"):
        flatten_layer_rope(config)


def test_an_unknown_packaged_model_name_is_a_path() -> None:
    from flywheel_model.prepare import resolve_source

    assert resolve_source(None) is None
    assert resolve_source("models/my.gguf") == Path("models/my.gguf")
