"""What every graph pass shares: a result that says what was applied and what was skipped, and why.

A pass is a small frozen dataclass whose fields are its settings; calling it on an
``onnx_graphsurgeon.Graph`` edits that graph in place and returns a :class:`PassResult`. Passes never run
a model.
"""

from __future__ import annotations

import dataclasses

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from nq_onnx import external_data


@dataclasses.dataclass(frozen=True)
class Skip:
    """A layer a pass left alone, with the reason in words a user can act on."""

    layer: str
    reason: str


@dataclasses.dataclass
class PassResult:
    graph: gs.Graph
    applied: list[str] = dataclasses.field(default_factory=list)
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    roles: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # what was created, by role

    @property
    def modified(self) -> bool:
        return bool(self.applied)


class _ExternalValues(LazyValues):
    """graphsurgeon's lazy values for a tensor in an external data file: mapped from the file when read, and
    still exported as the original reference when never read."""

    def __init__(self, tensor: onnx.TensorProto, folder: Path):
        super().__init__(tensor)
        self.folder = folder

    def load(self) -> np.ndarray:
        return external_data.array(self.tensor, self.folder)


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """``gs.import_onnx`` that can read the values of tensors kept in external data files."""
    graph = gs.import_onnx(model)
    folder = external_data.source_dir(model)
    if folder is not None:
        for tensor in graph.tensors().values():
            values = getattr(tensor, "_values", None)
            if isinstance(values, LazyValues) and external_data.is_external(values.tensor):
                tensor._values = _ExternalValues(values.tensor, folder)
    return graph


def consumers(graph: gs.Graph, tensor: gs.Tensor) -> list[gs.Node]:
    """Nodes reading ``tensor`` (graphsurgeon keeps this list on the tensor)."""
    return list(tensor.outputs)


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(out is tensor for out in graph.outputs)


def constant(name: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(name, np.ascontiguousarray(values))


def replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[i] = new


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def constant_through_identity(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of ``tensor`` if it is a constant, possibly behind ``Identity`` nodes (deduplicated initializers)."""
    seen = 0
    while not isinstance(tensor, gs.Constant):
        node = producer(tensor)
        if node is None or node.op != "Identity" or seen > 16:
            return None
        tensor, seen = node.inputs[0], seen + 1
    return tensor.values
