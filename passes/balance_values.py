"""Value balancing: per-channel factors for the attention output, folded into the value columns and the projection.

The attention output ``O = A V`` of a head is linear in each channel of ``V``, and the projection after it reads
channel ``c`` of its input from one channel of one head of ``O`` (through ``Transpose``/``Reshape``), which is one
column ``v(c)`` of the linear layer that makes ``V`` (a fused qkv, in the ``X @ W`` layout). With factors ``r > 0``
over the projection's input channels (a group's :attr:`~nq_onnx.core.plan.GroupPlan.value_balance`)::

    W_v'[:, v(c)] = W_v[:, v(c)] / r_c,   B_v'[v(c)] = B_v[v(c)] / r_c      the value columns divided
    O' = A V' = O diag(1 / r)                                                  every channel of O divided alike
    Y  = O' (diag(r) W_p) + B_p = O W_p + B_p                                  the projection's rows multiplied

so the float model computes the same output (exactly in real arithmetic; float32 moves it by rounding) with no node
added: SmoothQuant's migration of the projection input's spread into its weight rows (Xiao et al., 2023), the
division folded into the value columns as SmoothQuant folds it into ``v_proj`` before ``o_proj``. Both per-tensor
quantizers on the way see the balanced channels: the projection's input and, where ``A V`` is quantized, its ``V``
operand. Which column feeds which channel is read off the graph by pushing index arrays through the shape ops
(:func:`nq_onnx.passes.reparam_attention.trace_columns`). A site is refused, with the reason, where ``V`` is not a
block of a linear layer's columns, where those columns are read by anything but ``A V``, where ``A V``'s output
reaches anything but one linear layer's input through shape ops, or where a shape op cannot be followed. Every
changed constant is a new one.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from nq_onnx.core import naming
from nq_onnx.passes.base import GraphPass, PassResult, Role, Skip, SkipKind, constant_through_identity, nodes_by_name
from nq_onnx.passes.base import producer
from nq_onnx.passes.find_layers import LINEAR, Layers, layers_kept
from nq_onnx.passes.reparam_attention import linear_outputs, linear_source, rescale_columns, trace_columns
from nq_onnx.passes.reparam_layernorm import fold_into_layer


@dataclasses.dataclass(frozen=True)
class ValueSite:
    """An ``A @ V`` whose output only the layers of group ``group`` read: channel ``c`` of the group's tensor is
    column ``v_columns[c]`` of ``v_layer``'s output ``v_tensor``; the ``V`` operand (``operand``) holds column
    ``operand_columns`` of it times ``operand_factor`` (scalars on the way)."""

    group: str
    node: str
    v_layer: str
    v_tensor: str
    v_columns: np.ndarray
    operand: str
    operand_columns: np.ndarray
    operand_factor: float


@dataclasses.dataclass(frozen=True)
class BalanceValues(GraphPass):
    """``factors``: each group's ``r`` (float32, one per input channel), by group name. Layer specs found before the
    pass name the old weights: find the layers again on the rewritten graph."""

    layers: Layers
    factors: dict[str, np.ndarray]

    def __call__(self, graph: gs.Graph) -> PassResult:
        result = PassResult(graph)
        sites, refused = value_sites(graph, self.layers)
        found = {site.group: site for site in sites}
        for name, r in self.factors.items():
            site = found.get(name)
            if site is None:
                result.skipped.append(Skip(name, refused.get(name, "not the input of a projection after A @ V"),
                                           SkipKind.UNSUPPORTED))
                continue
            if r.shape != site.v_columns.shape or not np.all(r > 0):
                result.skipped.append(Skip(name, f"needs {site.v_columns.size} positive factors",
                                           SkipKind.UNSUPPORTED))
                continue
            nodes = nodes_by_name(graph)
            producer_spec = self.layers.layer(site.v_layer)
            scale = np.ones(producer_spec.out_features)
            scale[site.v_columns] = 1.0 / r.astype(np.float64)
            rescale_columns(graph, nodes, producer_spec, scale, np.zeros(producer_spec.out_features),
                            (naming.VALUE_WEIGHT, naming.VALUE_BIAS, naming.ADD_VALUE_BIAS))
            group = self.layers.group(name)
            for layer in group.consumers:
                fold_into_layer(graph, nodes, self.layers.layer(layer), r.astype(np.float64), np.zeros(r.size))
            result.applied.append(name)
            result.record(Role.BALANCED, name)
        return result

    def ensures(self, graph: gs.Graph, result: PassResult) -> str | None:
        """Every layer the pass was given is still there, of the same kind: the layers found again match."""
        return layers_kept(graph, self.layers)


def value_sites(graph: gs.Graph, layers: Layers) -> tuple[list[ValueSite], dict[str, str]]:
    """Every group :class:`BalanceValues` can rewrite, and, by group, why another reached from an ``A @ V`` cannot
    be (the graph is only read)."""
    outputs = linear_outputs(graph, layers)
    by_tensor = {g.tensor: g for g in layers.groups}
    sites, refused = [], {}
    for node in graph.nodes:
        if node.op != "MatMul" or not _reads_softmax(node):
            continue
        site = value_site(graph, layers, node, outputs, by_tensor)
        if isinstance(site, ValueSite):
            sites.append(site)
        elif site[0] is not None:
            refused[site[0]] = site[1]
    return sites, refused


def value_site(graph: gs.Graph, layers: Layers, node: gs.Node, outputs: dict, by_tensor: dict
               ) -> ValueSite | tuple[str | None, str]:
    """The site of ``A @ V`` node ``node``, or ``(group or None, why not)``."""
    source, why = linear_source(node.inputs[1], outputs)
    if source is None:
        return None, f"V is {why}"
    spec = outputs[source]
    reads = trace_columns(graph, graph.tensors()[source], spec.out_features)
    if isinstance(reads, str):
        return None, reads
    hits = [(a, f) for n, i, a, f in reads if n is node and i == 1]
    if len(hits) != 1:
        return None, f"V is not one traced block of {spec.name}"
    operand, factor = hits[0]
    used = set(operand.reshape(-1).tolist())
    for reader, index, arr, _ in reads:
        if not (reader is node and index == 1) and used.intersection(arr.reshape(-1).tolist()):
            what = "a graph output" if reader is None else f"{reader.op} {reader.name!r}"
            return None, f"the value columns of {spec.name} are also read by {what}"
    return _projection(graph, layers, node, (spec.name, source), operand, factor, by_tensor)


def _projection(graph: gs.Graph, layers: Layers, node: gs.Node, value: tuple[str, str], operand: np.ndarray,
                factor: float, by_tensor: dict) -> ValueSite | tuple[str | None, str]:
    """The group reading ``A @ V``'s output (its columns pushed on from the ``V`` operand's), or why not."""
    out = trace_columns(graph, node.outputs[0], 0, operand)
    if isinstance(out, str):
        return None, out
    linear = {layers.layer(name).node: layers.layer(name) for g in layers.groups for name in g.consumers
              if layers.layer(name).kind == LINEAR}
    readers = {id(n): (n, i, a) for n, i, a, _ in out}
    if not readers or any(n is None or n.name not in linear or i != 0 for n, i, _ in readers.values()):
        return None, "the attention output reaches more than linear layers' inputs"
    inputs = {n.inputs[0].name for n, _, _ in readers.values()}
    group = by_tensor.get(next(iter(inputs))) if len(inputs) == 1 else None
    if group is None or set(group.consumers) != {linear[n.name].name for n, _, _ in readers.values()}:
        return None, "the attention output is not one group's tensor read only by its layers"
    columns = next(iter(readers.values()))[2]
    if columns.shape[-1] != group.channels or columns.size != group.channels:
        return group.name, "its channels are not one column each of the value layer"
    columns = columns.reshape(-1).astype(np.int64)
    if np.unique(columns).size != columns.size:
        return group.name, "two of its channels read the same value column"
    return ValueSite(group.name, node.name, value[0], value[1], columns, node.inputs[1].name,
                     operand.reshape(-1).astype(np.int64), float(factor))


def _reads_softmax(node: gs.Node) -> bool:
    """``A @ V``: a MatMul of two activations whose first operand is a Softmax output (through ``Identity``)."""
    if constant_through_identity(node.inputs[1]) is not None:
        return False
    first = producer(node.inputs[0])
    while first is not None and first.op == "Identity":
        first = producer(first.inputs[0])
    return first is not None and first.op == "Softmax"
