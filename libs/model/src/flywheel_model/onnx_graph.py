"""Small helpers to rewrite an ONNX graph with its weights loaded (the GGUF encodings, the
output projection's rescoring): unique initializers, dead nodes dropped, external weights saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """[..., B] codes 0..15 -> [..., B/2] bytes as MatMulNBits reads them (element 2i low, 2i+1 high)."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


class Graph:
    """Small helper to add nodes and initializers with unique names."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        # Block sums already computed, by activation and block size: MatMuls that read the same
        # input share them.
        self.block_sums: dict[tuple[str, int], str] = {}

    def add_init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.graph.initializer.append(numpy_helper.from_array(array, name))
        self.inits[name] = self.graph.initializer[-1]
        return name

    def array(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        init = self.inits.get(name)
        return None if init is None else numpy_helper.to_array(init)


def constant(g: Graph, producers: dict[str, Any], name: str) -> np.ndarray | None:
    """The value of `name` where it is fixed: an initializer's, or a Constant node's."""
    from onnx import numpy_helper

    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        return next((numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"), None)
    return g.array(name)


def vocabularies(g: Graph, producers: dict[str, Any]) -> set[int]:
    """The row counts of the embedding tables Gathers read (an initializer, or the transpose of
    one), from their shapes."""
    lengths = set()
    for node in g.graph.node:
        if node.op_type != "Gather":
            continue
        table = g.inits.get(node.input[0])
        producer = producers.get(node.input[0])
        if table is None and producer is not None and producer.op_type == "Transpose":
            source = g.inits.get(producer.input[0])
            lengths |= {source.dims[1]} if source is not None and len(source.dims) == 2 else set()
        elif table is not None and len(table.dims) == 2:
            lengths.add(table.dims[0])
    return lengths


def drop_unused(g: Graph) -> None:
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


def replace_nodes(g: Graph, nodes: list[Any]) -> None:
    """Makes `nodes` the graph's, drops what nothing reads any more, and declares the
    com.microsoft domain (MatMulNBits) where it was not."""
    from onnx import helper

    g.graph.ClearField("node")
    g.graph.node.extend(nodes)
    drop_unused(g)
    if not any(o.domain == "com.microsoft" for o in g.model.opset_import):
        g.model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def save_model(model: Any, path: Path) -> None:
    """`path` and its weights in `<path>.data` (replaced, not appended to)."""
    import onnx

    data = path.with_name(f"{path.name}.data")
    data.unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
