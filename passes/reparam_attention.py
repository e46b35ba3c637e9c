"""Attention reparameterization: K centred and Q/K channels balanced for the per-tensor quantizers of ``Q K^T``.

Attention scores ``S = Q K^T`` read only by a Softmax over the keys (the last axis) do not change where ``K``
moves by a per-channel constant, and the product does not change where a channel of ``Q`` is scaled up by what
its partner channel of ``K`` is scaled down::

    softmax(Q K^T) = softmax(Q (K - 1 c^T)^T)      Q c is the same for every key of a query: a row constant
    Q K^T = (Q diag(s)) (K diag(1 / s))^T           s > 0 per pair of channels

Both fold into the columns of the linear layers that produce ``Q`` and ``K`` (a fused qkv or separate q and k, in
the ``X @ W`` layout)::

    W_q' = W_q diag(s),  B_q' = B_q * s,        W_k' = W_k diag(1 / s),  B_k' = (B_k - c) / s

so the float model computes the same output (exactly in real arithmetic; float32 moves it by rounding). The
per-tensor quantizers of ``Q`` and ``K`` then see centred, balanced channels
(:func:`nq_onnx.techniques.reparam_attention.attention_factors` chooses ``c`` and ``s``). K-centring is
SageAttention's "smooth K" (Zhang et al. 2025); the balance is SmoothQuant's migration (Xiao et al. 2023) between two
activations, folded into weights.

Which column of the linear layer becomes which channel of ``Q`` or ``K`` is read off the graph by pushing an index
array (the column numbers, with batch and token axes of size 1) through the shape ops between them: ``Reshape``,
``Transpose``, ``Split``, ``Gather``, ``Slice``, ``Squeeze``, ``Unsqueeze``, ``Identity`` and ``Mul``/``Div`` by a
scalar constant. A site is refused, with the reason, where a ``Q`` or ``K`` column reaches anything but the scores
``MatMul`` (the value half of a fused qkv may go anywhere), where the scores reach anything but one Softmax over the
last axis (through scalar ``Mul``/``Div``, ``Add`` and last-axis-keeping ``Reshape``), where the pairs of ``Q`` and
``K`` channels are not one-to-one (keys shared by several query heads), or where a shape op cannot be followed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from nq_onnx.core import naming
from nq_onnx.passes.base import GraphPass, PassResult, Role, Skip, SkipKind, constant, constant_through_identity
from nq_onnx.passes.base import add_bias_after, is_graph_output, nodes_by_name, producer
from nq_onnx.passes.find_layers import ACT_MATMUL, LINEAR, Layers, LayerSpec, const_value, layers_kept, require_matmul
from nq_onnx.core.plan import AttentionReparam

SHAPE_OPS = ("Reshape", "Transpose", "Split", "Gather", "Slice", "Squeeze", "Unsqueeze", "Identity", "Mul", "Div")


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """A scores ``MatMul`` whose operands are column blocks of linear layers: channel ``i`` of the reduction is
    column ``q_columns[i]`` of ``q_layer``'s output ``q_tensor`` times ``q_factor`` (scalar ``Mul``/``Div`` on the
    way), and likewise for ``K``."""

    layer: str
    q_layer: str
    q_tensor: str
    q_columns: np.ndarray
    q_factor: float
    k_layer: str
    k_tensor: str
    k_columns: np.ndarray
    k_factor: float


@dataclasses.dataclass(frozen=True)
class ReparamAttention(GraphPass):
    """``factors``: the reparameterization of each scores layer to rewrite, by layer name. Layer specs found before
    the pass name the old weights and biases: find the layers again on the rewritten graph."""

    layers: Layers
    factors: dict[str, AttentionReparam]

    def __call__(self, graph: gs.Graph) -> PassResult:
        result = PassResult(graph)
        for name, factor in self.factors.items():
            site = attention_site(graph, self.layers, name)
            if isinstance(site, str):
                result.skipped.append(Skip(name, site, SkipKind.ATTENTION_KEPT))
                continue
            if factor.scale.shape != site.q_columns.shape:
                result.skipped.append(Skip(name, f"its factors cover {factor.scale.size} channel pairs, the "
                                                 f"attention has {site.q_columns.size}", SkipKind.ATTENTION_KEPT))
                continue
            s, c = factor.scale.astype(np.float64), factor.shift.astype(np.float64)
            scale = {n: np.ones(self.layers.layer(n).out_features) for n in (site.q_layer, site.k_layer)}
            shift = {n: np.zeros(self.layers.layer(n).out_features) for n in (site.q_layer, site.k_layer)}
            scale[site.q_layer][site.q_columns] = s
            scale[site.k_layer][site.k_columns] = 1.0 / s
            shift[site.k_layer][site.k_columns] = c
            nodes = nodes_by_name(graph)
            for layer in scale:
                rescale_columns(graph, nodes, self.layers.layer(layer), scale[layer], shift[layer])
            result.applied.append(name)
            result.record(Role.REPARAMETERIZED, name)
        return result

    def ensures(self, graph: gs.Graph, result: PassResult) -> str | None:
        """Every layer the pass was given is still there, of the same kind: the layers found again match."""
        return layers_kept(graph, self.layers)


def attention_sites(graph: gs.Graph, layers: Layers) -> tuple[list[AttentionSite], list[Skip]]:
    """Every activation matmul that :class:`ReparamAttention` can rewrite, and the others with the reason (an
    ``A @ V`` of attention probabilities is not a scores matmul and is not listed)."""
    sites, skipped = [], []
    outputs = linear_outputs(graph, layers)  # the graph is only read here: one map serves every site
    for spec in layers.layers:
        if spec.kind != ACT_MATMUL or after_softmax(graph, spec):
            continue
        site = attention_site(graph, layers, spec.name, outputs)
        if isinstance(site, str):
            skipped.append(Skip(spec.name, site, SkipKind.ATTENTION_KEPT))
        else:
            sites.append(site)
    return sites, skipped


def attention_site(graph: gs.Graph, layers: Layers, name: str,
                   outputs: dict[str, LayerSpec] | None = None) -> AttentionSite | str:
    """The site of scores layer ``name``, or why it cannot be rewritten. ``outputs``: :func:`linear_outputs` of
    this graph as it is now (``None``: found here; a rewrite between two sites can move a layer's output)."""
    spec = layers.layer(name)
    if spec.kind != ACT_MATMUL:
        return "not an activation matmul"
    tensors = graph.tensors()
    node = next(n for n in graph.nodes if n.name == spec.node)
    reason = _softmax_reads_rows(graph, node.outputs[0])
    if reason:
        return reason
    outputs = linear_outputs(graph, layers) if outputs is None else outputs
    found = [linear_source(tensors[t], outputs) for t in spec.inputs]
    for what, (source, why) in zip(("Q", "K"), found):
        if source is None:
            return f"{what} is {why}"
    sources = [source for source, _ in found]
    reads: dict[str, list[tuple[gs.Node, int, np.ndarray, float]]] = {}
    for tensor_name in dict.fromkeys(sources):  # each source once, in operand order
        traced = trace_columns(graph, tensors[tensor_name], outputs[tensor_name].out_features)
        if isinstance(traced, str):
            return traced
        reads[tensor_name] = traced
    operand = []
    for index, tensor_name in enumerate(sources):
        hit = [(a, f) for n, i, a, f in reads[tensor_name] if n is node and i == index]
        if len(hit) != 1:
            return f"operand {index} is not one traced block of {outputs[tensor_name].name}"
        operand.append(hit[0])
    (qa, qf), (ka, kf) = operand
    if qa.ndim < 2 or ka.ndim < 2 or qa.shape[-2] != 1 or ka.shape[-1] != 1:
        return "the reduction axis of the scores is not the channel axis of Q and K"
    try:
        q_cols, k_cols = np.broadcast_arrays(qa[..., 0, :], ka[..., :, 0])
    except ValueError:
        return "Q and K channels do not pair up"
    q_cols, k_cols = q_cols.reshape(-1), k_cols.reshape(-1)
    if np.unique(q_cols).size != q_cols.size or np.unique(k_cols).size != k_cols.size:
        return "Q and K channels do not pair one to one (keys shared between query heads)"
    if sources[0] == sources[1] and np.intersect1d(q_cols, k_cols).size:
        return "Q and K share columns"
    used = {source: set() for source in sources}
    used[sources[0]] |= set(q_cols.tolist())
    used[sources[1]] |= set(k_cols.tolist())
    for tensor_name, columns in used.items():
        for reader, index, arr, _ in reads[tensor_name]:
            if reader is node and tensor_name == sources[index]:
                continue  # the operand itself: Q or K columns only, checked above
            if columns.intersection(arr.reshape(-1).tolist()):
                what = "a graph output" if reader is None else f"{reader.op} {reader.name!r}"
                return f"Q or K columns of {outputs[tensor_name].name} are also read by {what}"
    return AttentionSite(name, outputs[sources[0]].name, sources[0], q_cols.astype(np.int64), qf,
                         outputs[sources[1]].name, sources[1], k_cols.astype(np.int64), kf)


def after_softmax(graph: gs.Graph, spec: LayerSpec) -> bool:
    node = producer(graph.tensors()[spec.inputs[0]])
    return node is not None and node.op == "Softmax"


def linear_outputs(graph: gs.Graph, layers: Layers) -> dict[str, LayerSpec]:
    """The output tensor of every linear layer (after its biases, see :func:`bias_slots`), by tensor name."""
    nodes = nodes_by_name(graph)
    out = {}
    for spec in layers.layers:
        if spec.kind == LINEAR:
            slots = bias_slots(nodes, spec)
            out[(slots[-1][0] if slots else nodes[spec.node]).outputs[0].name] = spec
    return out


def bias_slots(nodes: dict, spec: LayerSpec) -> list[tuple[gs.Node, int]]:
    """The ``Add`` inputs holding the layer's biases: every per-column constant vector added in a row after the
    ``MatMul`` (the layer's own, one behind ``Identity`` where an exporter shares equal biases, and one a LayerNorm
    reparameterization added), found by position, not by name (an earlier rewrite may have replaced the constant)."""
    slots, tensor = [], nodes[spec.node].outputs[0]
    while len(tensor.outputs) == 1 and tensor.outputs[0].op == "Add":
        add = tensor.outputs[0]
        index = next((i for i, t in enumerate(add.inputs) if t is not tensor), None)
        value = None if index is None else _const(add.inputs[index])
        if value is None or value.shape != (spec.out_features,):
            break
        slots.append((add, index))
        tensor = add.outputs[0]
    return slots


def _const(tensor: gs.Tensor) -> np.ndarray | None:
    """A constant's value: an initializer (possibly behind ``Identity``) or a ``Constant`` node's."""
    value = const_value(tensor)
    return value if value is not None else constant_through_identity(tensor)


def _scalar(tensor: gs.Tensor) -> float | None:
    value = _const(tensor)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def linear_source(tensor: gs.Tensor, outputs: dict[str, LayerSpec]) -> tuple[str | None, str]:
    """The linear output above ``tensor`` through shape ops (its name), or ``None`` and what stands in the way."""
    while tensor.name not in outputs:
        node = producer(tensor)
        if node is None:
            return None, "not computed by a linear layer"
        data = 0
        if node.op == "Mul" and _scalar(node.inputs[0]) is not None:
            data = 1
        if node.op not in SHAPE_OPS or (node.op in ("Mul", "Div") and _scalar(node.inputs[1 - data]) is None):
            return None, f"computed by {node.op} {node.name!r}, not a linear layer through shape ops"
        tensor = node.inputs[data]
    return tensor.name, ""


def trace_columns(graph: gs.Graph, start: gs.Tensor, width: int, columns: np.ndarray | None = None
                  ) -> list[tuple[gs.Node | None, int, np.ndarray, float]] | str:
    """Every reader of ``start``'s columns beyond the shape ops: ``(node, input index, column of each element,
    scalar factor)`` with batch and token axes of size 1 (``node`` ``None``: a graph output); or why not.
    ``columns``: the column each element of ``start`` holds (default: ``start`` is a ``[.., .., width]`` output)."""
    first = np.arange(width, dtype=np.int64).reshape(1, 1, width) if columns is None else columns
    reads, stack = [], [(start, first, 1.0)]
    while stack:
        tensor, arr, factor = stack.pop()
        if is_graph_output(graph, tensor):
            reads.append((None, 0, arr, factor))
        for node in tensor.outputs:
            if node.op == "Shape":
                continue
            index = next(i for i, t in enumerate(node.inputs) if t is tensor)
            moved = _move(node, index, arr) if node.op in SHAPE_OPS else None
            if moved is None:
                reads.append((node, index, arr, factor))
                continue
            if isinstance(moved, str):
                return f"{node.op} {node.name!r} cannot be followed ({moved})"
            scale = 1.0
            if node.op == "Mul":
                scale = _scalar(node.inputs[1 - index])
            elif node.op == "Div":
                scale = 1.0 / _scalar(node.inputs[1])
            for out, value in zip(node.outputs, moved):
                stack.append((out, value, factor * scale))
    return reads


def _move(node: gs.Node, index: int, arr: np.ndarray) -> list[np.ndarray] | str | None:
    """The index arrays ``node`` outputs from ``arr`` in input ``index``; ``None`` where the node reads the values
    (not a shape op, or ``Mul``/``Div`` by other than a scalar constant); a reason where it cannot be followed."""
    op = node.op
    if index != 0 and op != "Mul":
        return None
    if op in ("Mul", "Div"):
        other = node.inputs[1 - index] if op == "Mul" else node.inputs[1]
        return [arr] if _scalar(other) is not None else None
    move = MOVES.get(op)
    return move(node, arr) if move is not None else None


def _move_transpose(node: gs.Node, arr: np.ndarray) -> list[np.ndarray] | str:
    """``Transpose``: the axes permuted alike (no ``perm``: reversed)."""
    perm = node.attrs.get("perm", list(range(arr.ndim))[::-1])
    return [np.transpose(arr, perm)] if len(perm) == arr.ndim else "rank"


def _move_reshape(node: gs.Node, arr: np.ndarray) -> list[np.ndarray] | str:
    """``Reshape`` with the batch and token axes at size 1: an entry computed at run time is such an axis, a ``0``
    copies the input's dimension (unless ``allowzero``); the channels must stay on the axes they fill."""
    shape = _shape_entries(node.inputs[1])
    if shape is None:
        return "shape not known"
    dims = [arr.shape[i] if d == 0 and not node.attrs.get("allowzero", 0) else (1 if d is None else d)
            for i, d in enumerate(shape)]
    try:
        return [arr.reshape(dims)]
    except ValueError:
        return "not over the channel axes"


def _move_squeeze(node: gs.Node, arr: np.ndarray) -> list[np.ndarray] | str:
    """``Squeeze``/``Unsqueeze`` by constant axes (an input from opset 13, an attribute before); a squeezed axis
    must have size 1 here, so a channel axis is never squeezed."""
    values = _const(node.inputs[1]) if len(node.inputs) > 1 else node.attrs.get("axes")
    if values is None:
        return "axes not known"
    values = np.asarray(values).reshape(-1)
    unsqueeze = node.op == "Unsqueeze"
    axes = [int(a) % (arr.ndim + (values.size if unsqueeze else 0)) for a in values]
    if unsqueeze:
        return [np.expand_dims(arr, tuple(axes))]
    return [np.squeeze(arr, tuple(axes))] if all(arr.shape[a] == 1 for a in axes) else "squeezes channels"


def _move_gather(node: gs.Node, arr: np.ndarray) -> list[np.ndarray] | str:
    """``Gather`` of constant indices within the axis here (an index past it gathers tokens, not channels)."""
    indices = _const(node.inputs[1])
    axis = int(node.attrs.get("axis", 0)) % arr.ndim
    if indices is None or np.any(indices >= arr.shape[axis]):
        return "indices not known, or over a token axis"
    return [np.take(arr, indices, axis=axis)]


def _move_split(node: gs.Node, arr: np.ndarray) -> list[np.ndarray] | str:
    """``Split`` into constant sizes (an input from opset 13, an attribute before; none: equal parts) that must
    cover the axis here exactly, one array per output."""
    axis = int(node.attrs.get("axis", 0)) % arr.ndim
    sizes = _const(node.inputs[1]) if len(node.inputs) > 1 else node.attrs.get("split")
    count = len(node.outputs)
    if sizes is None:
        if arr.shape[axis] % count:
            return "uneven split"
        sizes = [arr.shape[axis] // count] * count
    sizes = [int(v) for v in np.asarray(sizes).reshape(-1)]
    if sum(sizes) != arr.shape[axis]:
        return "split over a token axis"
    return np.split(arr, np.cumsum(sizes)[:-1], axis=axis)


def _move_slice(node: gs.Node, arr: np.ndarray) -> list[np.ndarray] | str:
    """``Slice`` with constant ``starts``, ``ends`` and optional ``axes`` and ``steps``; empty is refused."""
    values = [_const(t) for t in node.inputs[1:]]
    if any(v is None for v in values) or len(values) < 2:
        return "bounds not known"
    starts, ends = values[0], values[1]
    axes = values[2] if len(values) > 2 else np.arange(len(starts))
    steps = values[3] if len(values) > 3 else np.ones(len(starts), np.int64)
    index_tuple = [slice(None)] * arr.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index_tuple[int(axis) % arr.ndim] = slice(int(start), int(end), int(step))
    out = arr[tuple(index_tuple)]
    return [out] if out.size else "empty slice"


# how each shape op but Mul and Div (scalar factors, :func:`_move`) moves an index array from input 0 to its outputs
MOVES = {"Identity": lambda node, arr: [arr], "Transpose": _move_transpose, "Reshape": _move_reshape,
         "Squeeze": _move_squeeze, "Unsqueeze": _move_squeeze, "Gather": _move_gather, "Split": _move_split,
         "Slice": _move_slice}


def _shape_entries(tensor: gs.Tensor) -> list[int | None] | None:
    """A ``Reshape`` target: its constant entries, ``None`` for entries computed at run time (a ``Concat`` of
    pieces, as exporters write ``reshape(B, N, 3, H, D)``)."""
    value = _const(tensor)
    if value is not None:
        return [int(v) for v in value.reshape(-1)]
    node = producer(tensor)
    if node is None or node.op != "Concat":
        return None
    out: list[int | None] = []
    for piece in node.inputs:
        value = _const(piece)
        if value is not None:
            out += [int(v) for v in value.reshape(-1)]
        else:
            shape = getattr(piece, "shape", None)
            if shape is None or len(shape) != 1 or not isinstance(shape[0], int):
                return None
            out += [None] * shape[0]
    return out


def _softmax_reads_rows(graph: gs.Graph, scores: gs.Tensor) -> str:
    """Empty where ``scores`` reach one Softmax over the last axis through ops that keep a per-row constant
    constant (scalar ``Mul``/``Div``, ``Add``/``Sub`` of anything, last-axis-keeping ``Reshape``); else why not."""
    tensor = scores
    while True:
        readers = list(tensor.outputs)
        if is_graph_output(graph, tensor) or len(readers) != 1:
            return "the scores are read by more than a Softmax"
        node = readers[0]
        index = next(i for i, t in enumerate(node.inputs) if t is tensor)
        if node.op == "Softmax":
            rank = len(tensor.shape) if getattr(tensor, "shape", None) is not None else None
            axis = int(node.attrs.get("axis", -1 if graph.opset >= 13 else 1))
            if axis == -1 or (rank is not None and axis == rank - 1):
                return ""
            return f"Softmax {node.name!r} is not over the last axis"
        if node.op in ("Mul", "Div") and _scalar(node.inputs[1 - index if node.op == "Mul" else 1]) is not None \
                and (node.op == "Mul" or index == 0):
            pass
        elif node.op == "Add" or (node.op == "Sub" and index == 0):
            pass
        elif node.op == "Reshape":
            shape = _shape_entries(node.inputs[1])
            last = getattr(tensor, "shape", None)
            if not shape or last is None or not isinstance(last[-1], int) or shape[-1] != last[-1]:
                return f"Reshape {node.name!r} may move the key axis of the scores"
        else:
            return f"the scores go through {node.op} {node.name!r} before the Softmax"
        tensor = node.outputs[0]


def rescale_columns(graph: gs.Graph, nodes: dict, spec: LayerSpec, scale: np.ndarray, shift: np.ndarray,
                    names: tuple[str, str, str] = (naming.ATTENTION_WEIGHT, naming.ATTENTION_BIAS,
                                                   naming.ADD_ATTENTION_BIAS)) -> None:
    """``W' = W diag(scale)`` and ``B' = (B - shift) * scale`` as new constants (each of several biases scaled, the
    last one shifted; a missing bias is added where the shift is not zero); ``names``: the parts naming the new
    weight, bias and bias ``Add`` (another rewrite of the same layer names its own)."""
    weight, bias_part, add_part = names
    node = require_matmul(nodes[spec.node])
    w = constant_through_identity(node.inputs[1]).astype(np.float64)
    node.inputs[1] = constant(naming.of(spec.name, weight), (w * scale[None, :]).astype(np.float32))
    slots = bias_slots(nodes, spec)
    for number, (owner, slot) in enumerate(slots):
        bias = _const(owner.inputs[slot]).astype(np.float64) - (shift if number == len(slots) - 1 else 0.0)
        owner.inputs[slot] = constant(naming.of(spec.name, bias_part + (f"_{number}" if number else "")),
                                      (bias * scale).astype(np.float32))
    if not slots and np.any(shift):
        add_bias_after(graph, node, spec.name, constant(naming.of(spec.name, bias_part),
                                                        (-shift * scale).astype(np.float32)), add_part)
