"""The output projection read at 4 bits, with the likeliest tokens' logits computed exactly.

Decoding reads the whole output projection for every position it produces, and it is the largest
matrix a step reads: Gemma 3's tied 262,144 x 640 embedding is 671 MB in fp32, about two thirds of
a decode step's bytes. But a decode step needs only the likeliest tokens' logits exactly: greedy
decoding takes the first, candidate answers the first few. So the fp32 export's last step
(`rescore_output_projection`) replaces the projection's MatMul by

1. an approximation of every logit from a 4-bit copy of the matrix (blocks of 32 along the hidden
   size, a scale and a uint8 zero point each; ONNX Runtime's MatMulNBits with 8-bit activations,
   accuracy level 4, which stays fast for several rows),
2. the `RESCORED` likeliest tokens by that approximation (TopK),
3. their exact logits: their fp32 rows of the matrix (a Gather from the `[vocabulary, hidden]`
   table, which is the embedding table itself when the two are tied) times the hidden state,
4. scattered over the approximation (ScatterElements).

The likeliest token and the first `RESCORED` tokens' logits are then fp32's, summed in another
order, unless the true likeliest token falls outside the approximation's top `RESCORED` (the
approximation is off by a fraction of a logit; docs/inference.md has the measured margins). The
other logits keep the approximation, which matters only to sampling at a temperature: there a
token far down the list is drawn with a probability off by the factor its approximation is off.

The fp32 `[hidden, vocabulary]` weight leaves the graph (a tied model reads its embedding table
instead), so the graph is smaller, not larger. Any fp32 graph works: a model prepared from a GGUF, a
Hugging Face folder or a fine-tuned candidate.

The exporter projects only a run's last position (a Gather of position -1); the rewrite projects
the last `CHECKED` positions of a run that short instead, so that one decode step can check tokens
drafted ahead (generation.py, "Drafts"), while a prompt still projects only its last position.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from flywheel_model.onnx_graph import Graph, constant, pack_nibbles, replace_nodes, save_model, vocabularies

log = logging.getLogger(__name__)

# How many of the approximation's likeliest tokens get their exact logits.
RESCORED = 64
BLOCK = 32
# A run of at most this many positions gets every position's logits; a longer one (a prompt) its last.
CHECKED = 8
# The manifest's `export.output_projection` for a graph rewritten here.
RESCORED_PROJECTION = f"int4_rescored_top{RESCORED}_positions{CHECKED}"


def quantize_rows(
    table: np.ndarray, block: int = BLOCK, chunk: int = 8192
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`table` [N, K] as MatMulNBits' 4-bit inputs: packed codes [N, K/block, block/2], scales
    [N·K/block] and packed uint8 zero points, each block's minimum to maximum over 15 steps
    (K is zero-padded to whole blocks). `chunk` rows at a time, so that Gemma's 262,144-row table
    takes a few temporary copies of 8,192 rows, not of itself."""
    n, k = table.shape
    nblocks = -(-k // block)
    codes = np.empty((n, nblocks, block // 2), np.uint8)
    scales = np.empty((n, nblocks), np.float32)
    zero_points = np.zeros((n, nblocks + nblocks % 2), np.uint8)  # an odd count pads a nibble
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = np.zeros((stop - start, nblocks * block), np.float32)
        rows[:, :k] = table[start:stop]
        rows = rows.reshape(-1, nblocks, block)
        low = np.minimum(rows.min(-1), 0)
        step = np.maximum((np.maximum(rows.max(-1), 0) - low) / 15, np.finfo(np.float32).tiny)
        zero = np.clip(np.round(-low / step), 0, 15)
        codes[start:stop] = pack_nibbles(
            np.clip(np.round(rows / step[..., None]) + zero[..., None], 0, 15).astype(np.uint8)
        )
        scales[start:stop] = step
        zero_points[start:stop, :nblocks] = zero
    # Two blocks' zero points a byte, the even block in the low nibble.
    return codes, scales.ravel(), pack_nibbles(zero_points).ravel()


def rescore_output_projection(model: Any, rescored: int = RESCORED) -> Counter[str]:
    """Rewrites `model` in place: each MatMul as wide as an embedding table is long (the output
    projection) becomes the 4-bit approximation with the top `rescored` logits exact (module
    docstring). Counts what was rewritten."""
    from onnx import helper

    g = Graph(model)
    producers = {out: n for n in g.graph.node for out in n.output}
    lengths = vocabularies(g, producers)
    counts: Counter[str] = Counter()
    new_nodes: list[Any] = []
    for node in g.graph.node:
        init = g.inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if init is None or len(init.dims) != 2 or init.dims[1] not in lengths:
            new_nodes.append(node)
            continue
        weight = g.array(node.input[1])
        assert weight is not None
        table = _table(g, producers, node.input[1], weight) or g.add_init(
            f"{node.input[1]}.rows", np.ascontiguousarray(weight.T)
        )
        codes, scales, zero_points = quantize_rows(weight.T)
        hidden, vocabulary = weight.shape
        top = min(rescored, vocabulary)
        a, base = node.input[0], node.name or node.output[0]
        last = _last_position(g, producers, a)
        if last is not None:
            unsqueeze, source = last
            at = new_nodes.index(unsqueeze)
            new_nodes[at : at + 1] = _last_positions(g, source, a, base)
            _positions_axis(g, {a, node.output[0]})
            counts[f"output_projection_positions{CHECKED}"] += 1
        new_nodes += [
            helper.make_node(
                "MatMulNBits",
                [
                    a,
                    g.add_init(f"{base}.int4.B", codes),
                    g.add_init(f"{base}.int4.scales", scales),
                    g.add_init(f"{base}.int4.zero_points", zero_points),
                ],
                [f"{base}/approximate"],
                name=f"{base}/MatMulNBits",
                domain="com.microsoft",
                K=hidden,
                N=vocabulary,
                bits=4,
                block_size=BLOCK,
                accuracy_level=4,
            ),
            helper.make_node(
                "TopK",
                [f"{base}/approximate", g.add_init(f"{base}.rescored", np.array([top], np.int64))],
                [f"{base}/top_values", f"{base}/top"],
                name=f"{base}/TopK",
                axis=-1,
            ),
            # The rows [N, rescored, hidden] of the N = batch x positions rows' top tokens (indices of
            # rank 2, as an embedding's: a GGUF encoding reads them as its int8 rows), times each
            # row's hidden state as a column [N, hidden, 1].
            helper.make_node(
                "Reshape",
                [f"{base}/top", g.add_init(f"{base}.top_shape", np.array([-1, top], np.int64))],
                [f"{base}/top_rows"],
                name=f"{base}/TopRows",
            ),
            helper.make_node("Gather", [table, f"{base}/top_rows"], [f"{base}/rows"], name=f"{base}/Rows"),
            helper.make_node(
                "Reshape",
                [a, g.add_init(f"{base}.column_shape", np.array([-1, hidden, 1], np.int64))],
                [f"{base}/column"],
                name=f"{base}/Column",
            ),
            helper.make_node(
                "MatMul", [f"{base}/rows", f"{base}/column"], [f"{base}/exact_rows"], name=f"{base}/Exact"
            ),
            helper.make_node("Shape", [f"{base}/top"], [f"{base}/top_shape"], name=f"{base}/TopShape"),
            helper.make_node(
                "Reshape",
                [f"{base}/exact_rows", f"{base}/top_shape"],
                [f"{base}/exact"],
                name=f"{base}/ExactShape",
            ),
            helper.make_node(
                "ScatterElements",
                [f"{base}/approximate", f"{base}/top", f"{base}/exact"],
                list(node.output),
                name=f"{base}/Scatter",
                axis=-1,
            ),
        ]
        counts[f"output_projection_int4_rescored_top{top}"] += 1
    if not counts:
        return counts
    replace_nodes(g, new_nodes)
    return counts


def _last_position(g: Graph, producers: dict[str, Any], name: str) -> tuple[Any, str] | None:
    """The Unsqueeze that makes `name` of a Gather of position -1 (axis 1) and keeps that axis (the
    exporter's way to project only a run's last position), and the Gather's input."""
    unsqueeze = producers.get(name)
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
        return None
    gather = producers.get(unsqueeze.input[0])
    if gather is None or gather.op_type != "Gather":
        return None
    index, axes = constant(g, producers, gather.input[1]), constant(g, producers, unsqueeze.input[1])
    axis = next((a.i for a in gather.attribute if a.name == "axis"), 0)
    if index is None or index.tolist() != -1 or axis != 1 or axes is None or axes.tolist() != [1]:
        return None
    return unsqueeze, gather.input[0]


def _last_positions(g: Graph, source: str, out: str, base: str) -> list[Any]:
    """Nodes that make `out` the last n positions of `source` [batch, positions, hidden]: all of
    them when there are at most CHECKED, else the last alone."""
    from onnx import helper

    return [
        helper.make_node("Shape", [source], [f"{base}/positions"], name=f"{base}/Positions", start=1, end=2),
        helper.make_node(
            "LessOrEqual",
            [f"{base}/positions", g.add_init(f"{base}.checked", np.array([CHECKED], np.int64))],
            [f"{base}/checks"],
            name=f"{base}/Checks",
        ),
        helper.make_node(
            "Where",
            [f"{base}/checks", f"{base}/positions", g.add_init(f"{base}.one", np.array([1], np.int64))],
            [f"{base}/projected"],
            name=f"{base}/Projected",
        ),
        helper.make_node("Neg", [f"{base}/projected"], [f"{base}/first"], name=f"{base}/First"),
        helper.make_node(
            "Slice",
            [
                source,
                f"{base}/first",
                g.add_init(f"{base}.end", np.array([np.iinfo(np.int64).max], np.int64)),
                g.add_init(f"{base}.axis", np.array([1], np.int64)),
            ],
            [out],
            name=f"{base}/LastPositions",
        ),
    ]


def _positions_axis(g: Graph, names: set[str]) -> None:
    """Declares the position axis of the tensors `names` (the pruned hidden state and the logits,
    which the exporter declares of one position) variable."""
    for value in [*g.graph.output, *g.graph.value_info]:
        dims = value.type.tensor_type.shape.dim
        if value.name in names and len(dims) == 3:
            dims[1].dim_param = "positions"


def _table(g: Graph, producers: dict[str, Any], name: str, weight: np.ndarray) -> str | None:
    """The `[vocabulary, hidden]` embedding table holding the weight `name`'s columns as its rows (a
    tied model), rewiring a Gather that reads the weight's Transpose to read the table directly: the
    fp32 `[hidden, vocabulary]` weight can then leave the graph."""
    from onnx import numpy_helper

    rows_shape = list(reversed(weight.shape))
    for node in g.graph.node:
        if node.op_type != "Gather":
            continue
        source = node.input[0]
        producer = producers.get(source)
        if producer is not None and producer.op_type == "Transpose" and producer.input[0] == name:
            table = f"{name}.rows"
            if table not in g.inits:
                g.add_init(table, np.ascontiguousarray(weight.T))
            node.input[0] = table
            return table
        init = g.inits.get(source)
        if (
            init is not None
            and list(init.dims) == rows_shape
            and np.array_equal(numpy_helper.to_array(init), weight.T)
        ):
            return source
    return None


def rescore_onnx_dir(onnx_dir: Path) -> dict[str, int]:
    """Rewrites an fp32 `onnx_dir/model.onnx` (+ `.data`) with rescore_output_projection (the fp32
    CPU export's last step); counts what was rewritten."""
    import onnx

    model_path = onnx_dir / "model.onnx"
    model = onnx.load(str(model_path), load_external_data=True)
    counts = rescore_output_projection(model)
    if counts:
        save_model(model, model_path)
    log.info("output projection of %s: %s", model_path, dict(counts) or "not found")
    return dict(counts)


def main() -> None:
    """`python -m flywheel_model.output_projection ONNX_DIR` (export_onnx's step)."""
    import argparse

    parser = argparse.ArgumentParser(description=rescore_onnx_dir.__doc__)
    parser.add_argument("onnx_dir", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rescore_onnx_dir(args.onnx_dir)


if __name__ == "__main__":
    main()
