"""The GGUF block encoding computes what the fp32 graph it replaces computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
onnx = pytest.importorskip("onnx")

import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from flywheel_model.ggml_blocks import GgufBlockIndex, encode_model, parse_blocks  # noqa: E402

Q4_1 = gguf.GGMLQuantizationType.Q4_1
Q5_0 = gguf.GGMLQuantizationType.Q5_0
Q8_0 = gguf.GGMLQuantizationType.Q8_0
Q4_K = gguf.GGMLQuantizationType.Q4_K
Q6_K = gguf.GGMLQuantizationType.Q6_K
KINDS = {Q4_1: "q4_1", Q5_0: "q5_0", Q8_0: "q8_0", Q4_K: "q4_k", Q6_K: "q6_k"}


def k_quant(rng: np.random.Generator, rows: int, cols: int, kind: object) -> np.ndarray:
    """Random K-quant bytes (gguf-py has no K-quant quantizer): random codes and 6- or 8-bit
    scales, with small positive fp16 super-block scales so that no value overflows."""
    block_bytes, block = gguf.GGML_QUANT_SIZES[kind][1], gguf.GGML_QUANT_SIZES[kind][0]
    raw = rng.integers(0, 256, (rows, cols // block, block_bytes), dtype=np.uint8)
    scale = rng.uniform(1e-4, 1e-2, (rows, cols // block, 1)).astype(np.float16).view(np.uint8)
    if kind == Q4_K:  # d and dmin lead the block
        raw[..., 0:2] = scale
        raw[..., 2:4] = rng.uniform(1e-4, 1e-2, (rows, cols // block, 1)).astype(np.float16).view(np.uint8)
    else:  # Q6_K: d ends it
        raw[..., -2:] = scale
    return raw.reshape(rows, -1)


def quantize(rng: np.random.Generator, rows: int, cols: int, kind: object, scale: float = 0.1) -> np.ndarray:
    if kind in (Q4_K, Q6_K):
        return k_quant(rng, rows, cols, kind)
    return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32) * scale, kind)


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, object]]) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (raw, kind) in tensors.items():
        writer.add_tensor(name, raw, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feeds)[0])


@pytest.mark.parametrize("kind", list(KINDS))
def test_parsed_blocks_dequantize_exactly_like_gguf(kind: object) -> None:
    raw = quantize(np.random.default_rng(0), 8, 512, kind)
    blocks = parse_blocks(raw, KINDS[kind])
    expected = gguf.quants.dequantize(raw, kind)
    assert np.isfinite(expected).all() and np.abs(expected).max() > 0
    assert np.array_equal(blocks.dequantize(), expected)


def tiny_model(path: Path) -> tuple[onnx.ModelProto, set[str]]:
    """A small fp32 graph over a GGUF written to `path`, and its weights' names.

    A Q5_0 and a Q8_0 matrix fused side by side (as the exporter fuses q, k and v), a Q4_K, a Q6_K
    (blocks of 16) and a Q4_1 matrix, one Q8_0 table (embedding tied to the output projection) and
    one matrix off the grid (a fine-tune).
    """
    rng = np.random.default_rng(1)
    vocab, hidden, inner = 50, 256, 512
    raw = {
        "up_a": (quantize(rng, inner // 2, hidden, Q5_0), Q5_0),
        "up_b": (quantize(rng, inner // 2, hidden, Q8_0), Q8_0),
        "gate": (quantize(rng, inner, hidden, Q4_1), Q4_1),
        "down": (quantize(rng, hidden, inner, Q4_K), Q4_K),
        "side": (quantize(rng, hidden, inner, Q6_K), Q6_K),
        "embd": (quantize(rng, vocab, hidden, Q8_0, scale=1.0), Q8_0),
    }
    write_gguf(path, raw)
    w = {name: gguf.quants.dequantize(data, kind) for name, (data, kind) in raw.items()}
    inits = {  # MatMul weights are [K, N]: the GGUF's rows are their columns
        "up": np.concatenate([w["up_a"], w["up_b"]]).T.copy(),
        "gate": w["gate"].T.copy(),
        "down": w["down"].T.copy(),
        "side": w["side"].T.copy(),
        "tuned": (w["down"] + 1e-3).astype(np.float32).T.copy(),
        "lm_head": w["embd"].T.copy(),
    }
    nodes = [
        helper.make_node("Transpose", ["lm_head"], ["table"], perm=[1, 0]),
        helper.make_node("Gather", ["table", "ids"], ["x"]),
        helper.make_node("MatMul", ["x", "up"], ["u"]),
        helper.make_node("MatMul", ["x", "gate"], ["v"]),
        helper.make_node("Add", ["u", "v"], ["h"]),
        helper.make_node("MatMul", ["h", "down"], ["y"]),
        helper.make_node("MatMul", ["h", "side"], ["w"]),
        helper.make_node("MatMul", ["h", "tuned"], ["z"]),
        helper.make_node("Sum", ["y", "w", "z"], ["yz"]),
        helper.make_node("MatMul", ["yz", "lm_head"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), set(inits)


IDS = np.random.default_rng(2).integers(0, 50, (2, 7)).astype(np.int64)


def fp32_export(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """The tiny model saved as an fp32 export (`onnx/model.onnx` + `.data`), and its logits."""
    fp32, _ = tiny_model(tmp_path / "tiny.gguf")
    expected = run(fp32, {"ids": IDS})  # before saving: that moves the weights out of `fp32`
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    onnx.save_model(
        fp32, str(onnx_dir / "model.onnx"), save_as_external_data=True, location="model.onnx.data"
    )
    return onnx_dir, expected


def accuracy_levels(model: onnx.ModelProto) -> set[int]:
    return {
        a.i
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    }


# Accuracy level 1 keeps the activations in fp32: the same values up to the order of additions.
# Level 4 (gguf_a8) quantizes them to 8 bits per block, as llama.cpp does: close, not equal.
@pytest.mark.parametrize(("accuracy_level", "tolerance"), [(1, 2e-5), (4, 2e-2)])
def test_encoded_graph_reproduces_the_fp32_matmuls_and_embedding(
    tmp_path: Path, accuracy_level: int, tolerance: float
) -> None:
    fp32, inits = tiny_model(tmp_path / "tiny.gguf")
    expected = run(fp32, {"ids": IDS})

    encoded = onnx.ModelProto()
    encoded.CopyFrom(fp32)
    counts = encode_model(encoded, GgufBlockIndex(tmp_path / "tiny.gguf"), accuracy_level=accuracy_level)

    assert counts == {
        # The output projection at 4 bits, every one of its 50 logits computed exactly from the
        # Q8_0 table's rows (flywheel_model.output_projection), which the embedding reads too.
        "output_projection_int4_rescored_top50": 1,
        "matmul_q5_0+q8_0": 1,
        "matmul_q4_1": 1,
        "matmul_q4_k": 1,
        "matmul_q6_k": 1,
        "matmul_fp32": 1,
        "gather_q8_0": 2,
    }
    ops = [n.op_type for n in encoded.graph.node]
    # One 4-bit product per 4-bit matrix, two for 5 and 6 bits (up, side), and the approximation.
    assert ops.count("MatMulNBits") == 7 and "Transpose" not in ops
    assert sum(i.name.endswith(".q8.codes") for i in encoded.graph.initializer) == 1
    # Only the formats with a minimum need block sums (gate's of x, down's of h); the others'
    # centres are zero points.
    assert ops.count("ReduceSum") == 2
    zero_points = [n.name for n in encoded.graph.node if n.op_type == "MatMulNBits" and len(n.input) == 4]
    assert len(zero_points) == 5
    assert {i.name for i in encoded.graph.initializer} & set(inits) == {"tuned"}
    assert accuracy_levels(encoded) == {accuracy_level, 4}  # the approximation has 8-bit activations
    actual = run(encoded, {"ids": IDS})
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance * np.abs(expected).max())
    if accuracy_level == 4:
        assert not np.allclose(actual, expected, rtol=0, atol=2e-5 * np.abs(expected).max())


def test_weights_off_the_grid_are_not_found(tmp_path: Path) -> None:
    weights = np.random.default_rng(2).standard_normal((4, 32)).astype(np.float32)
    raw = gguf.quants.quantize(weights, Q4_1)
    write_gguf(tmp_path / "one.gguf", {"w": (raw, Q4_1)})
    index = GgufBlockIndex(tmp_path / "one.gguf")
    exact = gguf.quants.dequantize(raw, Q4_1)
    assert index.find(exact) is not None
    assert index.find(exact[::-1].copy()) is not None  # rows in another order are still found
    nudged = exact.copy()
    nudged[2, 5] = np.nextafter(nudged[2, 5], np.float32(1))
    assert index.find(nudged) is None


def test_the_prefill_graph_keeps_the_layers_in_fp32(tmp_path: Path) -> None:
    """encode_onnx_dir writes the decode graph (every matrix on the grid as blocks) and a prefill
    graph that keeps the matrices wider than 4 bits in fp32; both compute fp32's logits."""
    from flywheel_model.ggml_blocks import PREFILL_MODEL, encode_onnx_dir

    onnx_dir, expected = fp32_export(tmp_path)
    counts = encode_onnx_dir(onnx_dir, tmp_path / "tiny.gguf")

    assert counts["matmul_fp32"] == 1  # the fine-tuned matrix
    decode = onnx.load(str(onnx_dir / "model.onnx"))
    prefill = onnx.load(str(onnx_dir / PREFILL_MODEL))
    assert [n.op_type for n in decode.graph.node].count("MatMulNBits") == 7
    prefill_ops = [n.op_type for n in prefill.graph.node]
    # The output projection's approximation, the Q4_1 and the Q4_K matrix (with their offset
    # products); up (Q5_0 + Q8_0), side (Q6_K) and the fine-tuned matrix stay fp32, beside the
    # product of the rescored rows.
    assert prefill_ops.count("MatMulNBits") == 3
    assert prefill_ops.count("MatMul") == 3 + 2 + 1
    assert "Cast" in prefill_ops and "Transpose" not in prefill_ops  # the embedding's int8 rows
    assert {p.name for p in onnx_dir.iterdir()} == {
        "model.onnx",
        "model.onnx.data",
        PREFILL_MODEL,
        f"{PREFILL_MODEL}.data",
    }
    for graph in (decode, prefill):
        np.testing.assert_allclose(
            run(graph, {"ids": IDS}), expected, rtol=0, atol=2e-5 * np.abs(expected).max()
        )


def test_a_verified_export_switches_to_8_bit_activations_in_place(tmp_path: Path) -> None:
    from flywheel_model.ggml_blocks import (
        PREFILL_MODEL,
        encode_onnx_dir,
        fp32_activation_blocks,
        set_accuracy_level,
    )

    onnx_dir, expected = fp32_export(tmp_path)
    encode_onnx_dir(onnx_dir, tmp_path / "tiny.gguf", accuracy_level=1)
    data = (onnx_dir / "model.onnx.data").read_bytes()

    # Blocks times fp32 activations: a step of several positions costs several (no drafts).
    assert fp32_activation_blocks(onnx_dir / "model.onnx")
    # The decode graph's products and the prefill's; the approximations are at 4 already.
    assert set_accuracy_level(onnx_dir, 4) == 6 + 2
    assert not fp32_activation_blocks(onnx_dir / "model.onnx")
    assert (onnx_dir / "model.onnx.data").read_bytes() == data
    for name in ("model.onnx", PREFILL_MODEL):
        graph = onnx.load(str(onnx_dir / name))
        assert accuracy_levels(graph) == {4}
        actual = run(graph, {"ids": IDS})
        np.testing.assert_allclose(actual, expected, rtol=0, atol=2e-2 * np.abs(expected).max())
        assert not np.allclose(actual, expected, rtol=0, atol=2e-5 * np.abs(expected).max())
    assert set_accuracy_level(onnx_dir, 4) == 0
