"""Exact ONNX encodings of a GGUF's weight blocks, written into an fp32 decoder graph.

A model prepared from a GGUF is the GGUF's blocks dequantized to fp32, so every weight matrix of
the fp32 graph is known exactly by a few bits per weight plus a scale (and for some formats a
minimum) per block. This module finds each MatMul weight's columns (and each embedding table's
rows) among the GGUF's dequantized rows, checks that the blocks reproduce the fp32 values bit for
bit, and replaces the fp32 tensor by the blocks. The formats, each w = d·(q - c) (+ m) per block:

| format | block | bits of q | c | minimum m |
|---|---:|---:|---:|---|
| Q4_1 | 32 | 4 | 0 | per block |
| Q5_0 | 32 | 5 | 16 | |
| Q8_0 | 32 | 8 | 0 (int8 q) | |
| Q4_K | 32 (8 per super-block of 256, 6-bit scales and minimums) | 4 | 0 | per block |
| Q6_K | 16 (16 per super-block, int8 scales) | 6 | 32 | |

ONNX Runtime's MatMulNBits (4 bits, accuracy level 1, so activations stay fp32) computes
Σ s·(k - z)·a for 4-bit codes k and uint8 zero points z. A code of more than 4 bits is split into
two 4-bit digits (q = 16·hi + lo), each one such product; the centre c becomes the digits' zero
points, and a minimum is added back as one small product: Σ_blocks offset · (sum of the block's
activations) (`nibble_terms`). MatMulNBits' own float zero points would express the minimum
directly, but ONNX Runtime's CPU kernel then dequantizes the whole matrix on every call (measured
11x slower than fp32), as it does for 8 bits at accuracy level 1 (20x). An embedding Gather over a
Q8_0 table becomes a gather of int8 rows times their block scales.

Weights whose values are not on the GGUF's grid (a merged fine-tune's adapted matrices) stay fp32.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from flywheel_model.onnx_graph import Graph, pack_nibbles, replace_nodes, save_model
from flywheel_model.output_projection import rescore_output_projection

log = logging.getLogger(__name__)

Kind = Literal["q4_1", "q5_0", "q8_0", "q4_k", "q6_k"]


@dataclass(frozen=True)
class _Format:
    block: int  # weights per scale
    bits: int  # bits of the stored code
    center: int  # w = scale · (code - center) (+ minimum)


_FORMATS: dict[Kind, _Format] = {
    "q4_1": _Format(32, 4, 0),
    "q5_0": _Format(32, 5, 16),
    "q8_0": _Format(32, 8, 128),  # the int8 code + 128, as MatMulNBits' 8-bit zero point 128 reads it
    "q4_k": _Format(32, 4, 0),
    "q6_k": _Format(16, 6, 32),
}


@dataclass(frozen=True)
class BlockRows:
    """Rows of a block-quantized matrix: codes [R, blocks, block], scales and minimums [R, blocks]."""

    kind: Kind
    codes: np.ndarray  # uint8, 0 .. 2**bits - 1
    scales: np.ndarray  # float32, as gguf-py computes them
    mins: np.ndarray | None  # float32, added (Q4_K's are negated: gguf-py subtracts them)

    @property
    def format(self) -> _Format:
        return _FORMATS[self.kind]

    def dequantize(self) -> np.ndarray:
        """The fp32 rows, in the same arithmetic as gguf-py (so equal bit for bit to the export's)."""
        centered = (self.codes.astype(np.int16) - self.format.center).astype(np.float32)
        values = self.scales[..., None] * centered
        if self.mins is not None:
            values = values + self.mins[..., None]
        return values.reshape(self.codes.shape[0], -1)

    def take(self, rows: np.ndarray | slice) -> BlockRows:
        return BlockRows(
            self.kind,
            self.codes[rows],
            self.scales[rows],
            None if self.mins is None else self.mins[rows],
        )


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian fp16 bytes [..., 2] -> float32 [...]."""
    return raw.copy().view(np.float16)[..., 0].astype(np.float32)


def _nibbles(packed: np.ndarray, width: int) -> np.ndarray:
    """Bytes [..., n·width] -> [..., n, 2·width] codes: each run of `width` bytes gives its low
    nibbles, then its high nibbles (ggml's order)."""
    runs = packed.reshape(*packed.shape[:-1], -1, width)
    return np.concatenate([runs & 0x0F, runs >> 4], axis=-1)


def parse_blocks(raw: np.ndarray, kind: Kind) -> BlockRows:
    """GGUF tensor bytes [rows, row bytes] -> codes, scales and minimums (ggml's block layouts)."""
    rows = raw.shape[0]
    if kind == "q8_0":
        blocks = raw.reshape(rows, -1, 34)
        codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return BlockRows(kind, codes, _f16(blocks[..., 0:2]), None)
    if kind == "q4_1":
        blocks = raw.reshape(rows, -1, 20)
        codes = _nibbles(blocks[..., 4:], 16)[..., 0, :]
        return BlockRows(kind, codes, _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4]))
    if kind == "q5_0":
        blocks = raw.reshape(rows, -1, 22)
        high = blocks[..., 2:6].copy().view("<u4") >> np.arange(32, dtype=np.uint32)
        codes = _nibbles(blocks[..., 6:], 16)[..., 0, :] | ((high & 1).astype(np.uint8) << 4)
        return BlockRows(kind, codes, _f16(blocks[..., 0:2]), None)
    if kind == "q4_k":
        blocks = raw.reshape(rows, -1, 144)
        d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
        s = blocks[..., 4:16].reshape(rows, -1, 3, 4)
        lo, hi, mixed = s[..., 0, :], s[..., 1, :], s[..., 2, :]
        sc = np.concatenate([lo & 0x3F, (mixed & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)
        m = np.concatenate([hi & 0x3F, (mixed >> 4) | ((hi >> 2) & 0x30)], axis=-1)
        codes = _nibbles(blocks[..., 16:], 32).reshape(rows, -1, 32)
        scales = (d[..., None] * sc.astype(np.float32)).reshape(rows, -1)
        mins = -(dmin[..., None] * m.astype(np.float32)).reshape(rows, -1)
        return BlockRows(kind, codes, scales, mins)
    if kind == "q6_k":
        blocks = raw.reshape(rows, -1, 210)
        low = _nibbles(blocks[..., :128], 64).reshape(rows, -1, 8, 32)
        high = blocks[..., 128:192].reshape(rows, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]
        codes = (low | ((high & 3).reshape(rows, -1, 8, 32) << 4)).reshape(rows, -1, 16)
        d = _f16(blocks[..., 208:210])
        scales = (d[..., None] * blocks[..., 192:208].view(np.int8).astype(np.float32)).reshape(rows, -1)
        return BlockRows(kind, codes, scales, None)
    raise ValueError(f"unknown block kind {kind}")


def _row_key(row: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=16).digest()


@dataclass(frozen=True)
class Blocks:
    """A matrix [N, K] as blocks of one size, w = scale · (code - center) + minimum per block.

    Its rows may come from tensors of different formats (a fused q/k/v matrix); `bits` is the
    widest code, `kinds` what they were.
    """

    kinds: tuple[Kind, ...]
    block: int
    bits: int
    codes: np.ndarray  # uint8 [N, K/block, block]
    scales: np.ndarray  # float32 [N, K/block]
    centers: np.ndarray  # int [N]
    mins: np.ndarray  # float32 [N, K/block], zeros for the formats without one

    @property
    def label(self) -> str:
        return "+".join(self.kinds)

    @classmethod
    def of(cls, parts: list[BlockRows]) -> Blocks:
        return cls(
            tuple(sorted({p.kind for p in parts})),
            parts[0].format.block,
            max(p.format.bits for p in parts),
            np.concatenate([p.codes for p in parts]),
            np.concatenate([p.scales for p in parts]),
            np.concatenate([np.full(len(p.codes), p.format.center) for p in parts]),
            np.concatenate([np.zeros_like(p.scales) if p.mins is None else p.mins for p in parts]),
        )


class GgufBlockIndex:
    """Every row of a GGUF's block-quantized tensors (of the formats above), by its exact fp32 values;
    with `row_counts`, only of the tensors that have one of those numbers of rows."""

    def __init__(self, gguf_path: Path, row_counts: set[int] | None = None) -> None:
        from gguf import GGMLQuantizationType, GGUFReader

        kinds: dict[Any, Kind] = {
            GGMLQuantizationType.Q4_1: "q4_1",
            GGMLQuantizationType.Q5_0: "q5_0",
            GGMLQuantizationType.Q8_0: "q8_0",
            GGMLQuantizationType.Q4_K: "q4_k",
            GGMLQuantizationType.Q6_K: "q6_k",
        }
        self.tensors: list[BlockRows] = []
        self._where: dict[bytes, tuple[int, int]] = {}
        for tensor in GGUFReader(gguf_path).tensors:
            kind = kinds.get(tensor.tensor_type)
            # gguf-py's shape runs fastest axis first: a row's length, then the rows.
            if kind is None or (row_counts is not None and int(np.prod(tensor.shape[1:])) not in row_counts):
                continue
            rows = parse_blocks(np.asarray(tensor.data), kind)
            index = len(self.tensors)
            self.tensors.append(rows)
            for start, values in _chunks(rows):
                for r, row in enumerate(values, start):
                    self._where[_row_key(row)] = (index, r)

    def find(self, matrix: np.ndarray) -> Blocks | None:
        """The blocks of `matrix` [R, K] (each row a GGUF row), or None unless all equal exactly."""
        if matrix.ndim != 2 or matrix.dtype != np.float32:
            return None
        hits = [self._where.get(_row_key(row)) for row in matrix]
        if any(h is None for h in hits):
            return None
        tensor_ids = np.array([h[0] for h in hits if h is not None])
        row_ids = np.array([h[1] for h in hits if h is not None])
        # A fused matrix (q, k and v side by side) takes runs of rows from several tensors.
        runs = np.split(np.arange(len(hits)), np.flatnonzero(np.diff(tensor_ids)) + 1)
        parts = [self.tensors[tensor_ids[run[0]]].take(row_ids[run]) for run in runs]
        if len({p.format.block for p in parts}) != 1:
            return None
        for part, run in zip(parts, runs, strict=True):
            if not all(
                np.array_equal(values, matrix[run[start : start + len(values)]])
                for start, values in _chunks(part)
            ):
                return None
        return Blocks.of(parts)


def _chunks(rows: BlockRows, size: int = 4096) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, fp32 values) of `size` rows at a time: Gemma's embedding is 671 MB in fp32."""
    for start in range(0, len(rows.codes), size):
        yield start, rows.take(slice(start, start + size)).dequantize()


@dataclass(frozen=True)
class Term:
    """One 4-bit MatMulNBits product: Σ scale·(digit - zero_point)·a per block."""

    digits: np.ndarray  # uint8 0..15 [N, K/B, B]
    scales: np.ndarray  # float32 [N, K/B]
    zero_points: np.ndarray | None  # uint8 0..15 [N, K/B]; None is MatMulNBits' default 8


def nibble_terms(blocks: Blocks) -> tuple[list[Term], np.ndarray | None]:
    """`blocks` as 4-bit terms plus, for the formats with a minimum, per-block offsets.

    A code of up to 4 bits is one digit, a wider one two (q = 16·hi + lo, weights 16d and d).
    Without a minimum (Q5_0, Q8_0, Q6_K), the centre is the digits' zero points, c = 16·z_hi + z_lo,
    so W = 16d·(hi - z_hi) + d·(lo - z_lo) exactly and nothing is left over. With one (Q4_1, Q4_K),
    the digits keep the default zero point 8 and the rest is an offset per block, added as one small
    product: d·(q - c) + m = d·(q - 8) + (m + (8 - c)·d). (A rest as large as the centre itself would
    cancel against the products and lose precision, badly so with 8-bit activations.)
    """
    if blocks.bits <= 4:
        parts = [(blocks.codes, blocks.scales, blocks.centers)]
    else:
        parts = [
            (blocks.codes >> 4, 16 * blocks.scales, blocks.centers >> 4),
            (blocks.codes & 15, blocks.scales, blocks.centers & 15),
        ]
    if not blocks.mins.any():
        terms = [
            Term(digits.astype(np.uint8), scales, np.broadcast_to(z[:, None], scales.shape).astype(np.uint8))
            for digits, scales, z in parts
        ]
        return terms, None
    eights = 8 * sum(16**i for i in range(len(parts)))
    offsets = blocks.mins + (eights - blocks.centers[:, None]).astype(np.float32) * blocks.scales
    return [Term(digits.astype(np.uint8), scales, None) for digits, scales, _ in parts], offsets


def _matmul_nodes(g: Graph, node: Any, blocks: Blocks, accuracy_level: int) -> list[Any]:
    """The nodes that compute `node` (A @ W, W [K, N] as `blocks` [N, K/B, B]) from the blocks.

    Only 4-bit MatMulNBits with uint8 zero points (or none): ONNX Runtime's CPU kernel with fp32
    activations (accuracy level 1) dequantizes the whole matrix on every call for 8 bits or for
    float zero points (measured 20x and 11x slower than fp32), while 4 bits stay in its fast kernel.
    """
    from onnx import helper

    n, nblocks, _ = blocks.codes.shape
    a, out, base = node.input[0], node.output[0], node.name or node.output[0]
    terms, offsets = nibble_terms(blocks)
    nodes, partials = [], []
    for i, term in enumerate(terms):
        partials.append(f"{base}/nbits_{i}")
        inputs = [
            a,
            g.add_init(f"{base}.nbits_{i}.B", pack_nibbles(term.digits)),
            g.add_init(f"{base}.nbits_{i}.scales", term.scales.ravel()),
        ]
        if term.zero_points is not None:
            # Two blocks' zero points a byte, the even block in the low nibble; an odd count pads.
            z = term.zero_points
            padded = np.concatenate([z, np.zeros((n, nblocks % 2), np.uint8)], axis=1)
            inputs.append(g.add_init(f"{base}.nbits_{i}.zero_points", pack_nibbles(padded).ravel()))
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                inputs,
                [partials[-1]],
                name=f"{base}/MatMulNBits_{i}",
                domain="com.microsoft",
                K=nblocks * blocks.block,
                N=n,
                bits=4,
                block_size=blocks.block,
                accuracy_level=accuracy_level,
            )
        )
    if offsets is not None:
        partials.append(_offset_product(g, nodes, a, base, blocks, offsets))
    if len(partials) == 1:
        nodes[-1].output[0] = out
        return nodes
    total = partials[0]
    for i, partial in enumerate(partials[1:]):
        summed = out if i == len(partials) - 2 else f"{base}/sum_{i}"
        nodes.append(helper.make_node("Add", [total, partial], [summed], name=f"{base}/Add_{i}"))
        total = summed
    return nodes


def _offset_product(
    g: Graph, nodes: list[Any], a: str, base: str, blocks: Blocks, offsets: np.ndarray
) -> str:
    """Σ_b offset[b, n] · (sum of the activations in block b), appended to `nodes`; its output."""
    from onnx import helper

    _, nblocks, _ = blocks.codes.shape
    # [.., K] -> [.., K/B, B] -> [.., K/B], once per activation and block size.
    sums = g.block_sums.get((a, blocks.block))
    if sums is None:
        sums = g.block_sums[a, blocks.block] = f"{base}/block_sums"
        shape = g.add_init(f"{base}.nbits.block_shape", np.array([0, 0, nblocks, blocks.block], np.int64))
        axis = g.add_init(f"{base}.nbits.block_axis", np.array([-1], np.int64))
        nodes += [
            helper.make_node("Reshape", [a, shape], [f"{base}/blocks"], name=f"{base}/Reshape"),
            helper.make_node(
                "ReduceSum", [f"{base}/blocks", axis], [sums], name=f"{base}/ReduceSum", keepdims=0
            ),
        ]
    nodes.append(
        helper.make_node(
            "MatMul",
            [sums, g.add_init(f"{base}.nbits.offsets", offsets.T.copy())],
            [f"{base}/offset_output"],
            name=f"{base}/OffsetMatMul",
        )
    )
    return f"{base}/offset_output"


def _gather_nodes(g: Graph, node: Any, blocks: Blocks) -> list[Any]:
    """A Gather of rows [N, S] from a Q8_0 table [V, D] (the embedding, the output projection's
    rescored rows) as int8 rows times their block scales; Gathers of one table share them."""
    from onnx import TensorProto, helper

    vocab, nblocks, _ = blocks.codes.shape
    base, ids = node.name or node.output[0], node.input[1]
    codes, scales = f"{node.input[0]}.q8.codes", f"{node.input[0]}.q8.scales"
    if codes not in g.inits:
        g.add_init(codes, (blocks.codes.astype(np.int16) - 128).astype(np.int8))
        g.add_init(scales, blocks.scales.reshape(vocab, nblocks, 1))
    return [
        helper.make_node("Gather", [codes, ids], [f"{base}/codes"], name=f"{base}/Codes"),
        helper.make_node(
            "Cast", [f"{base}/codes"], [f"{base}/codes_f"], name=f"{base}/Cast", to=TensorProto.FLOAT
        ),
        helper.make_node(
            "Gather",
            [scales, ids],
            [f"{base}/scales"],
            name=f"{base}/Scales",
        ),
        helper.make_node(
            "Reshape",
            [
                f"{base}/codes_f",
                g.add_init(f"{base}.q8.block_shape", np.array([0, 0, nblocks, blocks.block], np.int64)),
            ],
            [f"{base}/blocks"],
            name=f"{base}/Reshape",
        ),
        helper.make_node("Mul", [f"{base}/blocks", f"{base}/scales"], [f"{base}/values"], name=f"{base}/Mul"),
        helper.make_node(
            "Reshape",
            [
                f"{base}/values",
                g.add_init(f"{base}.q8.row_shape", np.array([0, 0, nblocks * blocks.block], np.int64)),
            ],
            node.output,
            name=f"{base}/RowShape",
        ),
    ]


def _gather_table(g: Graph, node: Any, producers: dict[str, Any]) -> np.ndarray | None:
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


def encode_model(
    model: Any, index: GgufBlockIndex, *, accuracy_level: int = 1, prefill: bool = False
) -> Counter[str]:
    """Rewrites `model` (an onnx.ModelProto with its weights loaded) in place; counts what was encoded.

    `prefill` leaves in fp32 the layers' matrices whose codes are wider than 4 bits (two products
    each): the prefill graph's choice. The embedding is encoded in any case. The output projection is
    first read at 4 bits with its likeliest tokens' logits computed exactly from the table's rows
    (flywheel_model.output_projection), and those rows are the embedding's blocks too.
    """

    counts = rescore_output_projection(model)
    g = Graph(model)
    producers = {out: n for n in g.graph.node for out in n.output}
    new_nodes: list[Any] = []
    for node in g.graph.node:
        replaced: list[Any] | None = None
        if node.op_type == "MatMul" and node.input[1] in g.inits:
            weight = g.array(node.input[1])
            width = weight.shape[1] if weight is not None and weight.ndim == 2 else None
            blocks = index.find(weight.T) if weight is not None and width is not None else None
            if blocks is not None and prefill and blocks.bits > 4:
                counts[PREFILL_FP32] += 1
                blocks = None
            else:
                counts[f"matmul_{blocks.label}" if blocks else "matmul_fp32"] += 1
            if blocks is not None:
                replaced = _matmul_nodes(g, node, blocks, accuracy_level)
        elif node.op_type == "Gather" and not any(a.name == "axis" and a.i != 0 for a in node.attribute):
            table = _gather_table(g, node, producers)
            if table is not None:
                blocks = index.find(table)
                encodable = blocks is not None and blocks.kinds == ("q8_0",)
                counts["gather_q8_0" if encodable else "gather_fp32"] += 1
                if blocks is not None and encodable:
                    replaced = _gather_nodes(g, node, blocks)
        new_nodes.extend(replaced if replaced is not None else [node])
    replace_nodes(g, new_nodes)
    return counts


PREFILL_MODEL = "prefill.onnx"
# encode_model's count of the matrices the prefill graph keeps in fp32 (and the decode graph encodes).
PREFILL_FP32 = "matmul_fp32_for_prefill"


def encode_onnx_dir(onnx_dir: Path, gguf_path: Path, *, accuracy_level: int = 1) -> dict[str, int]:
    """Rewrites `onnx_dir/model.onnx` (+ `model.onnx.data`) with the GGUF's exact blocks and, when
    some of its matrices are wider than 4 bits, writes `prefill.onnx` (+ `.data`) beside it.

    The prefill graph keeps those matrices in fp32: a prompt multiplies each weight by hundreds of
    positions, where an fp32 product is compute-bound and faster than the two 4-bit products such a
    matrix takes (measured 1.7x the prefill time with Gemma 3's Q5_0 and Q6_K), while decoding one
    position a step is bound by reading the weights, where the blocks win. 4-bit matrices and the
    embedding are blocks in both, and both rescore the output projection (encode_model).
    """
    import onnx

    model_path = onnx_dir / "model.onnx"
    index = GgufBlockIndex(gguf_path)
    # One graph in memory at a time (Gemma's fp32 graph is 1.1 GB): the prefill graph first, from
    # the fp32 file, then the decode graph over it.
    prefill = onnx.load(str(model_path), load_external_data=True)
    prefill_counts = encode_model(prefill, index, accuracy_level=accuracy_level, prefill=True)
    if not prefill_counts[PREFILL_FP32]:  # nothing wider than 4 bits: one graph does both
        save_model(prefill, model_path)
        log.info("encoded %s from %s: %s", model_path, gguf_path.name, dict(prefill_counts))
        return dict(prefill_counts)
    save_model(prefill, onnx_dir / PREFILL_MODEL)
    del prefill
    model = onnx.load(str(model_path), load_external_data=True)
    counts = encode_model(model, index, accuracy_level=accuracy_level)
    save_model(model, model_path)
    log.info(
        "encoded %s from %s: %s (prefill graph: %s)",
        model_path,
        gguf_path.name,
        dict(counts),
        dict(prefill_counts),
    )
    return dict(counts)


def set_accuracy_level(onnx_dir: Path, level: int) -> int:
    """Sets every MatMulNBits' accuracy level in the graphs of `onnx_dir` (their weights untouched);
    returns how many nodes changed. A model verified with fp32 activations (level 1) is served with
    8-bit ones (level 4) this way: the same blocks, another arithmetic."""
    import onnx

    changed = 0
    for path in (onnx_dir / "model.onnx", onnx_dir / PREFILL_MODEL):
        if not path.is_file():
            continue
        model = onnx.load(str(path), load_external_data=False)
        for node in model.graph.node:
            for attribute in node.attribute:
                if (
                    node.op_type == "MatMulNBits"
                    and attribute.name == "accuracy_level"
                    and attribute.i != level
                ):
                    attribute.i = level
                    changed += 1
        onnx.save_model(model, str(path))
    return changed


def fp32_activation_blocks(model_path: Path) -> bool:
    """Whether the graph multiplies 4-bit blocks by fp32 activations (MatMulNBits at accuracy level
    0 or 1: the `gguf` precision). ONNX Runtime's CPU kernel then takes 2.5x as long for a step of
    five positions as for one, against 1.6x with fp32 MatMuls or 8-bit activations, and drafts
    decoded SmolLM2 at 0.86x the speed of a token a step (docs/inference.md, "Drafts")."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return any(
        node.op_type == "MatMulNBits"
        and next((a.i for a in node.attribute if a.name == "accuracy_level"), 0) <= 1
        for node in graph.node
    )


def main() -> None:
    """`python -m flywheel_model.ggml_blocks ONNX_DIR GGUF [--accuracy-level N]` (export_onnx's step)."""
    import argparse

    parser = argparse.ArgumentParser(description=encode_onnx_dir.__doc__)
    parser.add_argument("onnx_dir", type=Path)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--accuracy-level", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    encode_onnx_dir(args.onnx_dir, args.gguf, accuracy_level=args.accuracy_level)


if __name__ == "__main__":
    main()
