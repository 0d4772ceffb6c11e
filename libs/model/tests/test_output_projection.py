"""The output projection read at 4 bits gives the likeliest tokens' fp32 logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import ModelProto, TensorProto, helper, numpy_helper

from flywheel_model.output_projection import (
    CHECKED,
    quantize_rows,
    rescore_onnx_dir,
    rescore_output_projection,
)

VOCAB, HIDDEN = 300, 80  # 80 is two blocks and a half: the last block is zero-padded
IDS = np.random.default_rng(2).integers(0, VOCAB, (2, 7)).astype(np.int64)


def tiny_model(table: str, last_position: bool = False) -> ModelProto:
    """An embedding, one layer and an output projection: tied through a Transpose (as SmolLM2's
    export), tied as a second copy of the table (as Gemma 3's), or untied; of every position, or
    (`last_position`) of the last one alone, as the exporter prunes it."""
    rng = np.random.default_rng(1)
    lm_head = rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32)
    inits = {"lm_head": lm_head, "layer": (rng.standard_normal((HIDDEN, HIDDEN)) * 0.3).astype(np.float32)}
    nodes = []
    if table == "transpose":
        nodes.append(helper.make_node("Transpose", ["lm_head"], ["table"], perm=[1, 0]))
    else:
        copy = (
            lm_head.T.copy() if table == "copy" else rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
        )
        inits["table"] = copy
    nodes += [
        helper.make_node("Gather", ["table", "ids"], ["x"]),
        helper.make_node("MatMul", ["x", "layer"], ["h"]),
    ]
    if last_position:
        inits["axis_one"] = np.array([1], np.int64)
        nodes += [
            helper.make_node(
                "Constant", [], ["minus_one"], value=numpy_helper.from_array(np.array(-1, np.int64))
            ),
            helper.make_node("Gather", ["h", "minus_one"], ["h_last"], axis=1),
            helper.make_node("Unsqueeze", ["h_last", "axis_one"], ["h_pruned"]),
        ]
    nodes.append(helper.make_node("MatMul", ["h_pruned" if last_position else "h", "lm_head"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [
            helper.make_tensor_value_info(
                "logits", TensorProto.FLOAT, ["b", 1 if last_position else "s", VOCAB]
            )
        ],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
        # The exporter declares its tensors' shapes, the pruned hidden state's of one position.
        value_info=[helper.make_tensor_value_info("h_pruned", TensorProto.FLOAT, ["b", 1, HIDDEN])]
        if last_position
        else None,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def run(model: ModelProto, ids: np.ndarray = IDS) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"ids": ids})[0])


@pytest.mark.parametrize("table", ["transpose", "copy", "untied"])
def test_the_likeliest_tokens_get_fp32_logits_and_the_rest_an_approximation(table: str) -> None:
    model = tiny_model(table)
    expected = run(model)

    assert rescore_output_projection(model, rescored=16) == {"output_projection_int4_rescored_top16": 1}

    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 1 and {"TopK", "ScatterElements"} <= set(ops)
    assert "Transpose" not in ops
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    # The fp32 [hidden, vocabulary] weight is gone; one [vocabulary, hidden] table serves both the
    # embedding and the exact rows, unless the model is untied.
    assert (HIDDEN, VOCAB) not in shapes.values()
    assert list(shapes.values()).count((VOCAB, HIDDEN)) == (2 if table == "untied" else 1)
    actual = run(model)
    assert actual.shape == expected.shape
    for position in range(IDS.size):
        want, got = expected.reshape(-1, VOCAB)[position], actual.reshape(-1, VOCAB)[position]
        assert got.argmax() == want.argmax()
        top = np.argsort(-want)[:8]
        np.testing.assert_allclose(got[top], want[top], rtol=1e-5, atol=1e-5)
        # The rest is the 4-bit approximation (a tenth of a logit's spread, on random weights).
        assert np.abs(got - want).max() < 0.25 * np.abs(want).max()
    assert not np.allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_a_vocabulary_no_larger_than_the_rescored_count_is_all_exact() -> None:
    model = tiny_model("transpose")
    expected = run(model)
    assert rescore_output_projection(model, rescored=1000) == {
        f"output_projection_int4_rescored_top{VOCAB}": 1
    }
    np.testing.assert_allclose(run(model), expected, rtol=1e-5, atol=1e-4)


def test_a_short_run_projects_every_position_and_a_prompt_only_its_last() -> None:
    every = run(tiny_model("copy"), np.random.default_rng(4).integers(0, VOCAB, (2, 20)))
    model = tiny_model("copy", last_position=True)

    assert rescore_output_projection(model, rescored=16) == {
        "output_projection_int4_rescored_top16": 1,
        f"output_projection_positions{CHECKED}": 1,
    }

    # ONNX Runtime sees a variable position axis (Decoder.drafts keys on it).
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].shape == ["b", "positions", VOCAB]
    assert not any(n.op_type == "Unsqueeze" for n in model.graph.node)
    ids = np.random.default_rng(4).integers(0, VOCAB, (2, 20))
    for length in (1, 5, CHECKED, CHECKED + 1, 20):
        logits = run(model, ids[:, :length])
        projected = length if length <= CHECKED else 1
        assert logits.shape == (2, projected, VOCAB)
        # Each projected position as the whole run's (a prefix of the run sees the same positions).
        want = every[:, length - projected : length]
        assert (logits.argmax(-1) == want.argmax(-1)).all()
        np.testing.assert_allclose(logits.max(-1), want.max(-1), rtol=1e-5, atol=1e-5)


def test_the_4_bit_rows_are_within_half_a_step_of_the_weights() -> None:
    table = np.random.default_rng(3).standard_normal((5, HIDDEN)).astype(np.float32)
    codes, scales, zero_points = quantize_rows(table)
    blocks = -(-HIDDEN // 32)
    assert codes.shape == (5, blocks, 16) and scales.shape == (5 * blocks,)
    digits = np.stack([codes & 15, codes >> 4], axis=-1).reshape(5, blocks, 32).astype(np.float32)
    z = np.stack([zero_points & 15, zero_points >> 4], axis=-1).reshape(5, -1)[:, :blocks]
    restored = ((digits - z[..., None]) * scales.reshape(5, blocks, 1)).reshape(5, -1)[:, :HIDDEN]
    step = np.repeat(scales.reshape(5, blocks), 32, axis=1)[:, :HIDDEN]
    assert (np.abs(restored - table) <= step / 2 + 1e-6).all()


def test_an_export_without_an_output_projection_is_left_as_it_was(tmp_path: Path) -> None:
    import onnx

    model = tiny_model("transpose")
    model.graph.node.pop()  # no output projection: the hidden state is the output
    model.graph.output[0].name = "h"
    model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value = HIDDEN
    onnx.save_model(
        model, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data"
    )
    before = (tmp_path / "model.onnx.data").read_bytes()
    assert rescore_onnx_dir(tmp_path) == {}
    assert (tmp_path / "model.onnx.data").read_bytes() == before
