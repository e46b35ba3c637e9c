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
edited. Elsewhere an explicit ``Add(X, N)`` is inserted (role ``NOISE_ADD``; folded ones are ``NOISE_FOLDED``). A
group whose plan has no noise or an all-zero ``N`` is left as it is, so zero noise gives exactly the plain QDQ
graph. Pair this pass with ``fold_denoising_bias``: together, without quantization, they leave outputs unchanged.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from nq_onnx.core import naming
from nq_onnx.passes.base import (
    GraphPass,
    PassResult,
    Role,
    Skip,
    SkipKind,
    constant,
    constant_through_identity,
    nodes_by_name,
    replace_input,
)
from nq_onnx.passes.channels import channel_source
from nq_onnx.passes.find_layers import GroupSpec, Layers
from nq_onnx.core.plan import GroupPlan, Plan


@dataclasses.dataclass(frozen=True)
class InsertNoise(GraphPass):
    layers: Layers
    plan: Plan
    fold: bool = True

    def __call__(self, graph: gs.Graph) -> PassResult:
        result = PassResult(graph)
        tensors = graph.tensors()
        nodes = nodes_by_name(graph)
        for group in self.layers.groups:
            plan = self.plan.groups.get(group.name)
            skip = _skip(group, plan)
            if skip is not None:
                result.skipped.append(skip)
                continue
            x = tensors[group.tensor]
            readers = {self.layers.layer(name).node for name in group.consumers}
            folded = _fold_into_producer(graph, x, readers, group, plan.noise) if self.fold else None
            if folded is not None:
                result.record(Role.NOISE_FOLDED, folded)
            else:
                noisy = gs.Variable(naming.of(group.name, naming.NOISY_INPUT), dtype=np.float32,
                                    shape=getattr(x, "shape", None))
                noise = constant(naming.of(group.name, naming.NOISE), plan.noise.astype(np.float32))
                add = gs.Node("Add", name=naming.of(group.name, naming.ADD_NOISE), inputs=[x, noise], outputs=[noisy])
                graph.nodes.append(add)
                for name in readers:
                    replace_input(nodes[name], x, noisy)
                result.record(Role.NOISE_ADD, add.name)
                result.record(Role.NOISE, noise.name)
            result.applied.append(group.name)
        return result


    def requires(self, graph: gs.Graph) -> str | None:
        """Every group's tensor in the graph, and no group's quantizer yet: the noise is added before it (a model
        that arrived with Q/DQ nodes of its own is not concerned: only the quantizers ``insert_qdq`` names are)."""
        tensors, nodes = graph.tensors(), nodes_by_name(graph)
        for group in self.layers.groups:
            if group.tensor not in tensors:
                return f"group {group.name!r}'s tensor {group.tensor!r} is not in the graph"
            if naming.of(group.name, naming.INPUT_QUANTIZE) in nodes:
                return f"group {group.name!r} is already quantized; the noise goes before its quantizer"
        return None

    def ensures(self, graph: gs.Graph, result: PassResult) -> str | None:
        """Every layer of a group given an ``Add`` reads ``X + N`` (a folded ``N`` changes the producer instead)."""
        nodes, added = nodes_by_name(graph), set(result.names(Role.NOISE_ADD))
        for group in (g for g in self.layers.groups if naming.of(g.name, naming.ADD_NOISE) in added):
            noisy = naming.of(group.name, naming.NOISY_INPUT)
            for name in group.consumers:
                if not any(t.name == noisy for t in nodes[self.layers.layer(name).node].inputs):
                    return f"layer {name!r} does not read its group's noisy input"
        return None

def _skip(group: GroupSpec, plan: GroupPlan | None) -> Skip | None:
    if plan is None:
        return Skip(group.name, "not in the plan", SkipKind.NOT_PLANNED)
    if plan.noise is None or not np.any(plan.noise):
        return Skip(group.name, "no noise (zero vector or method without noise)", SkipKind.NO_NOISE)
    if not group.noisy:
        return Skip(group.name, "read by an activation matmul, which takes no noise", SkipKind.NOT_NOISY)
    return None


def _fold_into_producer(graph: gs.Graph, x: gs.Tensor, readers: set[str], group: GroupSpec,
                        noise: np.ndarray) -> str | None:
    """Fold ``noise`` into the bias that produces ``x`` where that is exact; the folded bias's name, else ``None``."""
    node = channel_source(graph, x, readers)
    if node is None:
        return None
    if node.op == "LayerNormalization" and len(node.inputs) == 3:
        slot = 2
    elif node.op == "Add" and len(node.inputs) == 2:
        slot = next((i for i, t in enumerate(node.inputs) if constant_through_identity(t) is not None), None)
        if slot is None:
            return None
    else:
        return None
    values = constant_through_identity(node.inputs[slot])
    if values is None or values.dtype != np.float32:
        return None
    if values.size != noise.size or values.shape[-1] != noise.size:
        return None  # only a bias over the channel axis can absorb a per-channel N
    folded = (values.astype(np.float64) + noise.astype(np.float64).reshape(values.shape)).astype(np.float32)
    node.inputs[slot] = constant(naming.of(group.name, naming.NOISE_FOLDED_BIAS), folded)
    return node.inputs[slot].name
