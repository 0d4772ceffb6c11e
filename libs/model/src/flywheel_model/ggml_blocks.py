"""Exact ONNX encodings of a GGUF's Q4_1 and Q8_0 weight blocks, written into an fp32 decoder graph.

A model prepared from a GGUF is the GGUF's blocks dequantized to fp32, so every weight matrix of
the fp32 graph is known exactly by 4 or 8 bits per weight plus a scale (and, for Q4_1, a minimum)
per block of 32. This module finds each MatMul weight's columns (and each embedding table's rows)
among the GGUF's dequantized rows, checks that the blocks reproduce the fp32 values bit for bit,
and replaces the fp32 tensor by the blocks:

- Q4_1 (w = d·q + m, q in 0..15): ONNX Runtime's MatMulNBits (4 bits, block 32, accuracy level 1,
  so activations stay fp32) computes Σ d·(q - 8)·a; the minimum is added back as a second, small
  product: Σ_blocks (m + 8·d) · (sum of the block's activations). MatMulNBits' own float zero
  points would express the minimum directly, but ONNX Runtime's CPU kernel then dequantizes the
  whole matrix on every call (measured 11x slower than fp32), and uint8 zero points cannot express it.
- Q8_0 (w = d·q, q in -128..127): MatMulNBits with 8 bits (its default zero point 128), and an
  embedding Gather becomes a gather of int8 rows times their block scales.

Weights whose values are not on the GGUF's grid (a merged fine-tune) are left in fp32.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)

BLOCK = 32
Kind = Literal["q4_1", "q8_0"]
# Bytes per block in the GGUF: fp16 scale (+ fp16 minimum for Q4_1) and the packed codes.
_BLOCK_BYTES: dict[Kind, int] = {"q4_1": 4 + BLOCK // 2, "q8_0": 2 + BLOCK}


@dataclass(frozen=True)
class BlockRows:
    """Rows of a block-quantized matrix: codes [R, blocks, 32], scales and minimums [R, blocks]."""

    kind: Kind
    codes: np.ndarray  # uint8: Q4_1 0..15; Q8_0 the int8 code + 128 (MatMulNBits' zero point 128)
    scales: np.ndarray  # float32 (fp16 values)
    mins: np.ndarray | None  # float32 (fp16 values); Q4_1 only

    def dequantize(self) -> np.ndarray:
        """The fp32 rows, in the same arithmetic as gguf-py (so equal bit for bit to the export's)."""
        if self.kind == "q4_1":
            assert self.mins is not None
            values = self.scales[..., None] * self.codes.astype(np.float32) + self.mins[..., None]
        else:
            values = (self.codes.astype(np.int16) - 128).astype(np.float32) * self.scales[..., None]
        return values.reshape(self.codes.shape[0], -1)

    def take(self, rows: np.ndarray) -> BlockRows:
        return BlockRows(
            self.kind,
            self.codes[rows],
            self.scales[rows],
            None if self.mins is None else self.mins[rows],
        )


def parse_blocks(raw: np.ndarray, kind: Kind) -> BlockRows:
    """GGUF tensor bytes [rows, blocks·block_bytes] -> codes, scales and minimums."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, _BLOCK_BYTES[kind])
    scales = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "q8_0":
        codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return BlockRows(kind, codes, scales, None)
    mins = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., 4:]
    # ggml keeps element j in the low nibble and element j + 16 in the high nibble of byte j.
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)
    return BlockRows(kind, codes, scales, mins)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """[..., 32] codes 0..15 -> [..., 16] bytes as MatMulNBits reads them (element 2i low, 2i+1 high)."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _row_key(row: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=16).digest()


class GgufBlockIndex:
    """Every Q4_1 and Q8_0 row of a GGUF, found by its exact fp32 values."""

    def __init__(self, gguf_path: Path) -> None:
        from gguf import GGMLQuantizationType, GGUFReader

        kinds: dict[Any, Kind] = {GGMLQuantizationType.Q4_1: "q4_1", GGMLQuantizationType.Q8_0: "q8_0"}
        self.tensors: list[BlockRows] = []
        self._where: dict[bytes, tuple[int, int]] = {}
        for tensor in GGUFReader(gguf_path).tensors:
            kind = kinds.get(tensor.tensor_type)
            if kind is None:
                continue
            rows = parse_blocks(np.asarray(tensor.data), kind)
            index = len(self.tensors)
            self.tensors.append(rows)
            for r, values in enumerate(rows.dequantize()):
                self._where[_row_key(values)] = (index, r)

    def find(self, matrix: np.ndarray) -> BlockRows | None:
        """The blocks of `matrix` [R, K] (each row a GGUF row), or None unless all equal exactly."""
        if matrix.ndim != 2 or matrix.dtype != np.float32 or matrix.shape[1] % BLOCK:
            return None
        hits = [self._where.get(_row_key(row)) for row in matrix]
        if any(h is None for h in hits):
            return None
        tensor_ids = np.array([h[0] for h in hits if h is not None])
        row_ids = np.array([h[1] for h in hits if h is not None])
        if len({self.tensors[t].kind for t in set(tensor_ids.tolist())}) != 1:
            return None
        # A fused matrix (q, k and v side by side) takes runs of rows from several tensors.
        runs = np.split(np.arange(len(hits)), np.flatnonzero(np.diff(tensor_ids)) + 1)
        blocks = _concat([self.tensors[tensor_ids[run[0]]].take(row_ids[run]) for run in runs])
        if not np.array_equal(blocks.dequantize(), matrix):
            return None
        return blocks


def _concat(parts: list[BlockRows]) -> BlockRows:
    mins = [p.mins for p in parts]
    return BlockRows(
        parts[0].kind,
        np.concatenate([p.codes for p in parts]),
        np.concatenate([p.scales for p in parts]),
        None if any(m is None for m in mins) else np.concatenate([m for m in mins if m is not None]),
    )


class _Graph:
    """Small helper to add nodes and initializers with unique names."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        # Block sums already computed, by activation: MatMuls that read the same input share them.
        self.block_sums: dict[str, str] = {}

    def add_init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def array(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        init = self.inits.get(name)
        return None if init is None else numpy_helper.to_array(init)


def nibble_terms(blocks: BlockRows) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """`blocks` as 4-bit terms (codes 0..15 [N, K/32, 32], scales [N, K/32]) plus block offsets.

    W = Σ_terms scale·(code - 8) + offset, per block: what MatMulNBits without zero points computes
    for each term, and one small product for the offsets. Q4_1: d·q + m = d·(q - 8) + (m + 8d).
    Q8_0 (q = 16·hi + lo, hi in -8..7, lo in 0..15): d·q = 16d·hi + d·(lo - 8) + 8d.
    """
    if blocks.kind == "q4_1":
        assert blocks.mins is not None
        return [(blocks.codes, blocks.scales)], blocks.mins + 8 * blocks.scales
    q = blocks.codes.astype(np.int16) - 128
    high, low = ((q >> 4) + 8).astype(np.uint8), (q & 15).astype(np.uint8)
    return [(high, 16 * blocks.scales), (low, blocks.scales)], 8 * blocks.scales


def _matmul_nodes(g: _Graph, node: Any, blocks: BlockRows, accuracy_level: int) -> list[Any]:
    """The nodes that compute `node` (A @ W, W [K, N] as `blocks` [N, K/32, 32]) from the blocks.

    Only 4-bit MatMulNBits without zero points: ONNX Runtime's CPU kernel with fp32 activations
    (accuracy level 1) dequantizes the whole matrix on every call for 8 bits or for float zero
    points (measured 20x and 11x slower than fp32), while 4 bits stay in its fast kernel.
    """
    from onnx import helper

    n, nblocks, _ = blocks.codes.shape
    a, out, base = node.input[0], node.output[0], node.name or node.output[0]
    terms, offsets = nibble_terms(blocks)
    nodes, partials = [], []
    for i, (codes, scales) in enumerate(terms):
        partials.append(f"{base}/nbits_{i}")
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [
                    a,
                    g.add_init(f"{base}.nbits_{i}.B", pack_nibbles(codes)),
                    g.add_init(f"{base}.nbits_{i}.scales", scales.ravel()),
                ],
                [partials[-1]],
                name=f"{base}/MatMulNBits_{i}",
                domain="com.microsoft",
                K=nblocks * BLOCK,
                N=n,
                bits=4,
                block_size=BLOCK,
                accuracy_level=accuracy_level,
            )
        )
    # Σ_b offset[b, n] · (sum of the activations in block b): [.., K] -> [.., K/32, 32] -> [.., K/32].
    sums = g.block_sums.get(a)
    if sums is None:
        sums = g.block_sums[a] = f"{base}/block_sums"
        shape = g.add_init(f"{base}.nbits.block_shape", np.array([0, 0, nblocks, BLOCK], np.int64))
        axis = g.add_init(f"{base}.nbits.block_axis", np.array([-1], np.int64))
        nodes += [
            helper.make_node("Reshape", [a, shape], [f"{base}/blocks"], name=f"{base}/Reshape"),
            helper.make_node(
                "ReduceSum", [f"{base}/blocks", axis], [sums], name=f"{base}/ReduceSum", keepdims=0
            ),
        ]
    partials.append(f"{base}/offset_output")
    nodes.append(
        helper.make_node(
            "MatMul",
            [sums, g.add_init(f"{base}.nbits.offsets", offsets.T.copy())],
            [partials[-1]],
            name=f"{base}/OffsetMatMul",
        )
    )
    total = partials[0]
    for i, partial in enumerate(partials[1:]):
        summed = out if i == len(partials) - 2 else f"{base}/sum_{i}"
        nodes.append(helper.make_node("Add", [total, partial], [summed], name=f"{base}/Add_{i}"))
        total = summed
    return nodes


def _gather_nodes(g: _Graph, node: Any, blocks: BlockRows) -> list[Any]:
    """An embedding Gather over a Q8_0 table [V, D] as int8 rows times their block scales."""
    from onnx import TensorProto, helper

    vocab, nblocks, _ = blocks.codes.shape
    base = node.name or node.output[0]
    table = (blocks.codes.astype(np.int16) - 128).astype(np.int8)
    ids = node.input[1]
    return [
        helper.make_node(
            "Gather", [g.add_init(f"{base}.q8.codes", table), ids], [f"{base}/codes"], name=f"{base}/Codes"
        ),
        helper.make_node(
            "Cast", [f"{base}/codes"], [f"{base}/codes_f"], name=f"{base}/Cast", to=TensorProto.FLOAT
        ),
        helper.make_node(
            "Gather",
            [g.add_init(f"{base}.q8.scales", blocks.scales.reshape(vocab, nblocks, 1)), ids],
            [f"{base}/scales"],
            name=f"{base}/Scales",
        ),
        helper.make_node(
            "Reshape",
            [
                f"{base}/codes_f",
                g.add_init(f"{base}.q8.block_shape", np.array([0, 0, nblocks, BLOCK], np.int64)),
            ],
            [f"{base}/blocks"],
            name=f"{base}/Reshape",
        ),
        helper.make_node("Mul", [f"{base}/blocks", f"{base}/scales"], [f"{base}/values"], name=f"{base}/Mul"),
        helper.make_node(
            "Reshape",
            [
                f"{base}/values",
                g.add_init(f"{base}.q8.row_shape", np.array([0, 0, nblocks * BLOCK], np.int64)),
            ],
            node.output,
            name=f"{base}/RowShape",
        ),
    ]


def _gather_table(g: _Graph, node: Any, producers: dict[str, Any]) -> np.ndarray | None:
    """The embedding table [V, D] a Gather reads: an initializer, or the transpose of one (tied)."""
    direct = g.array(node.input[0])
    if direct is not None:
        return direct
    producer = producers.get(node.input[0])
    if producer is None or producer.op_type != "Transpose":
        return None
    perm = next((list(a.ints) for a in producer.attribute if a.name == "perm"), [1, 0])
    source = g.array(producer.input[0])
    return None if source is None or source.ndim != 2 or perm != [1, 0] else source.T


def encode_model(model: Any, index: GgufBlockIndex, *, accuracy_level: int = 1) -> Counter[str]:
    """Rewrites `model` (an onnx.ModelProto with its weights loaded) in place; counts what was encoded."""
    from onnx import helper

    g = _Graph(model)
    producers = {out: n for n in g.graph.node for out in n.output}
    counts: Counter[str] = Counter()
    new_nodes: list[Any] = []
    for node in g.graph.node:
        replaced: list[Any] | None = None
        if node.op_type == "MatMul" and node.input[1] in g.inits:
            weight = g.array(node.input[1])
            blocks = (
                index.find(np.ascontiguousarray(weight.T))
                if weight is not None and weight.ndim == 2
                else None
            )
            counts[f"matmul_{blocks.kind}" if blocks else "matmul_fp32"] += 1
            if blocks is not None:
                replaced = _matmul_nodes(g, node, blocks, accuracy_level)
        elif node.op_type == "Gather" and not any(a.name == "axis" and a.i != 0 for a in node.attribute):
            table = _gather_table(g, node, producers)
            if table is not None:
                blocks = index.find(np.ascontiguousarray(table))
                encodable = blocks is not None and blocks.kind == "q8_0"
                counts["gather_q8_0" if encodable else "gather_fp32"] += 1
                if blocks is not None and encodable:
                    replaced = _gather_nodes(g, node, blocks)
        new_nodes.extend(replaced if replaced is not None else [node])
    g.graph.ClearField("node")
    g.graph.node.extend(new_nodes)
    _drop_unused(g)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return counts


def _drop_unused(g: _Graph) -> None:
    """Removes initializers and nodes (the tied table's Transpose) nothing reads any more."""
    while True:
        used = {i for n in g.graph.node for i in n.input} | {o.name for o in g.graph.output}
        dead = [n for n in g.graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.graph.node.remove(n)
    keep = [i for i in g.graph.initializer if i.name in used]
    g.graph.ClearField("initializer")
    g.graph.initializer.extend(keep)


def encode_onnx_dir(onnx_dir: Path, gguf_path: Path, *, accuracy_level: int = 1) -> dict[str, int]:
    """Rewrites `onnx_dir/model.onnx` (+ `model.onnx.data`) with the GGUF's exact blocks."""
    import onnx

    model_path = onnx_dir / "model.onnx"
    model = onnx.load(str(model_path), load_external_data=True)
    counts = encode_model(model, GgufBlockIndex(gguf_path), accuracy_level=accuracy_level)
    data = onnx_dir / "model.onnx.data"
    data.unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(model_path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    log.info("encoded %s from %s: %s", model_path, gguf_path.name, dict(counts))
    return dict(counts)
