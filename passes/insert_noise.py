"""Insert NoisyQuant's fixed noisy bias before the activation quantizer of each noisy group.

For an activation group reading ``X`` with stored noise vector ``N`` (one value per input channel, the last
axis of ``X``), every linear layer of the group reads ``X + N`` instead of ``X``. Where it costs nothing, the
noise is folded into the float bias that produces ``X`` (the paper's zero-overhead case)::

    LayerNormalization(x, gamma, beta) + N  =  LayerNormalization(x, gamma, beta + N)
    (Z + b) + N                             =  Z + (b + N)       (a bias Add: a Linear's bias, a decomposed LN)

also through ops that only move tokens (``Gather`` of the class token, ``Unsqueeze``/``Squeeze`` of a leading
axis, ``Identity``), since ``(X + N)[i] = X[i] + N`` when ``N`` runs along the untouched last axis,

which is allowed only when the group's layers are the only readers of ``X`` (no other node but ``Shape`` and no
graph output may see the shifted tensor) and ``b`` is a constant over the last axis (also behind the ``Identity``
chains exporters emit for deduplicated initializers); the folded bias is a new constant, the old one is never
edited.
Elsewhere an explicit ``Add(X, N)`` named ``{group}/add_noise`` is inserted. A group whose plan has no noise or
an all-zero ``N`` is left as it is, so zero noise gives exactly the plain QDQ graph. Pair this pass with
``fold_denoising_bias``: together, without quantization, they leave outputs unchanged.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from nq_onnx.passes.base import (
    PassResult,
    Skip,
    constant,
    constant_through_identity,
    is_graph_output,
    producer,
    replace_input,
)
from nq_onnx.passes.find_layers import GroupSpec, Layers
from nq_onnx.plan import Plan

FOLDED = "noise folded into the preceding bias (no Add at inference)"


@dataclasses.dataclass(frozen=True)
class InsertNoise:
    layers: Layers
    plan: Plan
    fold: bool = True

    def __call__(self, graph: gs.Graph) -> PassResult:
        result = PassResult(graph)
        tensors = graph.tensors()
        nodes = {n.name: n for n in graph.nodes}
        for group in self.layers.groups:
            plan = self.plan.groups.get(group.name)
            if plan is None:
                result.skipped.append(Skip(group.name, "not in the plan"))
                continue
            if plan.noise is None or not np.any(plan.noise):
                result.skipped.append(Skip(group.name, "no noise (zero vector or method without noise)"))
                continue
            if not group.noisy:
                result.skipped.append(Skip(group.name, "read by an activation matmul, which takes no noise"))
                continue
            x = tensors[group.tensor]
            readers = {self.layers.layer(name).node for name in group.consumers}
            if self.fold and _fold_into_producer(graph, x, readers, group, plan.noise):
                result.skipped.append(Skip(group.name, FOLDED))
                continue
            noisy = gs.Variable(f"{group.name}/noisy_input", dtype=np.float32, shape=getattr(x, "shape", None))
            noise = constant(f"{group.name}/noise", plan.noise.astype(np.float32))
            graph.nodes.append(gs.Node("Add", name=f"{group.name}/add_noise", inputs=[x, noise], outputs=[noisy]))
            for name in readers:
                replace_input(nodes[name], x, noisy)
            result.applied.append(group.name)
        return result


def _fold_into_producer(graph: gs.Graph, x: gs.Tensor, readers: set[str], group: GroupSpec, noise: np.ndarray) -> bool:
    tensor, allowed = x, readers
    while True:
        node = producer(tensor)
        # Shape reads only the shape, which X + N keeps; every other reader must be on the path to the group.
        if (
            node is None
            or is_graph_output(graph, tensor)
            or any(c.name not in allowed and c.op != "Shape" for c in tensor.outputs)
        ):
            return False
        if not _moves_tokens_only(node):
            break
        tensor, allowed = node.inputs[0], {node.name}
    if node.op == "LayerNormalization" and len(node.inputs) == 3:
        slot = 2
    elif node.op == "Add" and len(node.inputs) == 2:
        slot = next((i for i, t in enumerate(node.inputs) if constant_through_identity(t) is not None), None)
        if slot is None:
            return False
    else:
        return False
    values = constant_through_identity(node.inputs[slot])
    if values is None or values.dtype != np.float32:
        return False
    if values.size != noise.size or values.shape[-1] != noise.size:
        return False  # only a bias over the channel axis can absorb a per-channel N
    folded = (values.astype(np.float64) + noise.astype(np.float64).reshape(values.shape)).astype(np.float32)
    node.inputs[slot] = constant(f"{group.name}/noise_folded_bias", folded)
    return True


def _rank(tensor: gs.Tensor) -> int | None:
    shape = getattr(tensor, "shape", None)
    return len(shape) if shape is not None else None


def _moves_tokens_only(node: gs.Node) -> bool:
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
