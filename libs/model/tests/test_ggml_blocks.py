"""The Q4_1 / Q8_0 block encoding computes what the fp32 graph it replaces computes."""

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
Q8_0 = gguf.GGMLQuantizationType.Q8_0


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


@pytest.mark.parametrize("kind", [Q4_1, Q8_0])
def test_parsed_blocks_dequantize_exactly_like_gguf(kind: object) -> None:
    weights = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    raw = gguf.quants.quantize(weights, kind)
    blocks = parse_blocks(raw, "q4_1" if kind == Q4_1 else "q8_0")
    assert np.array_equal(blocks.dequantize(), gguf.quants.dequantize(raw, kind))


# Accuracy level 1 keeps the activations in fp32: the same values up to the order of additions.
# Level 4 (q4_1_a8) quantizes them to 8 bits per block, as llama.cpp does: close, not equal.
@pytest.mark.parametrize(("accuracy_level", "tolerance"), [(1, 2e-5), (4, 2e-2)])
def test_encoded_graph_reproduces_the_fp32_matmuls_and_embedding(
    tmp_path: Path, accuracy_level: int, tolerance: float
) -> None:
    rng = np.random.default_rng(1)
    vocab, hidden, inner = 50, 64, 96
    # Two Q4_1 matrices fused side by side (as the exporter fuses q, k and v), one Q8_0 table
    # (embedding tied to the output projection) and one matrix off the grid (a fine-tune).
    up_a = gguf.quants.quantize(rng.standard_normal((inner // 2, hidden)).astype(np.float32) * 0.1, Q4_1)
    up_b = gguf.quants.quantize(rng.standard_normal((inner // 2, hidden)).astype(np.float32) * 0.1, Q4_1)
    down = gguf.quants.quantize(rng.standard_normal((hidden, inner)).astype(np.float32) * 0.1, Q4_1)
    side = gguf.quants.quantize(rng.standard_normal((hidden, inner)).astype(np.float32) * 0.1, Q4_1)
    table = gguf.quants.quantize(rng.standard_normal((vocab, hidden)).astype(np.float32), Q8_0)
    write_gguf(
        tmp_path / "tiny.gguf",
        {
            "up_a": (up_a, Q4_1),
            "up_b": (up_b, Q4_1),
            "down": (down, Q4_1),
            "side": (side, Q4_1),
            "embd": (table, Q8_0),
        },
    )
    up = np.concatenate([gguf.quants.dequantize(up_a, Q4_1), gguf.quants.dequantize(up_b, Q4_1)])
    down_w = gguf.quants.dequantize(down, Q4_1)
    embd = gguf.quants.dequantize(table, Q8_0)
    tuned = (down_w + 1e-3).astype(np.float32)
    inits = {
        "up": up.T.copy(),  # MatMul weights are [K, N]: the GGUF's rows are their columns
        "down": down_w.T.copy(),
        "side": gguf.quants.dequantize(side, Q4_1).T.copy(),
        "tuned": tuned.T.copy(),
        "lm_head": embd.T.copy(),
    }
    nodes = [
        helper.make_node("Transpose", ["lm_head"], ["table"], perm=[1, 0]),
        helper.make_node("Gather", ["table", "ids"], ["x"]),
        helper.make_node("MatMul", ["x", "up"], ["h"]),
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
    fp32 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    ids = rng.integers(0, vocab, (2, 7)).astype(np.int64)
    expected = run(fp32, {"ids": ids})

    encoded = onnx.ModelProto()
    encoded.CopyFrom(fp32)
    counts = encode_model(encoded, GgufBlockIndex(tmp_path / "tiny.gguf"), accuracy_level=accuracy_level)

    assert counts == {"matmul_q4_1": 3, "matmul_q8_0": 1, "matmul_fp32": 1, "gather_q8_0": 1}
    ops = [n.op_type for n in encoded.graph.node]
    assert ops.count("MatMulNBits") == 5 and "Transpose" not in ops
    assert ops.count("ReduceSum") == 3  # block sums of x, h (shared by two products) and yz
    assert {i.name for i in encoded.graph.initializer} & set(inits) == {"tuned"}
    levels = {
        a.i
        for n in encoded.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    }
    assert levels == {accuracy_level}
    actual = run(encoded, {"ids": ids})
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
