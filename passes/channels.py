"""The node that produces a group's input along its channel axis, found through ops that only move tokens.

A per-channel change of ``X`` (adding ``N``, scaling by ``1 / r``) can be folded into the node that produces it
when every op between them acts on the other axes only: ``Gather`` of a token, ``Unsqueeze``/``Squeeze`` of a
leading axis, ``Identity`` (``(X + N)[i] = X[i] + N``, ``(X / r)[i] = X[i] / r``), and when nothing but the group's
layers (and ``Shape``, which only reads the shape) sees the changed tensor.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from nq_onnx.passes.base import constant_through_identity, is_graph_output, producer


def channel_source(graph: gs.Graph, x: gs.Tensor, readers: set[str]) -> gs.Node | None:
    """The first node above ``x`` that is not a token-moving op, where every tensor on the way is read only by the
    path to ``readers`` (node names) or by ``Shape``, and none is a graph output; else ``None``."""
    tensor, allowed = x, readers
    while True:
        node = producer(tensor)
        if (
            node is None
            or is_graph_output(graph, tensor)
            or any(c.name not in allowed and c.op != "Shape" for c in tensor.outputs)
        ):
            return None
        if not moves_tokens_only(node):
            return node
        tensor, allowed = node.inputs[0], {node.name}


def _rank(tensor: gs.Tensor) -> int | None:
    shape = getattr(tensor, "shape", None)
    return len(shape) if shape is not None else None


def moves_tokens_only(node: gs.Node) -> bool:
    """True for ops that select or reshape along axes other than the last (channel) one: ``(X + N)[i] = X[i] + N``."""
    if node.op == "Identity":
        return True
    rank_in = _rank(node.inputs[0])
    if rank_in is None:
        return False
    if node.op == "Gather":
        axis = int(node.attrs.get("axis", 0))
        return 0 <= (axis if axis >= 0 else axis + rank_in) < rank_in - 1
    if node.op in ("Unsqueeze", "Squeeze") and len(node.inputs) == 2:
        axes = constant_through_identity(node.inputs[1])
        if axes is None:
            return False
        rank = rank_in + len(axes) if node.op == "Unsqueeze" else rank_in
        return all(0 <= (a if a >= 0 else a + rank) < rank - 1 for a in axes.tolist())
    return False
