"""Channel balancing: per-channel factors for a group whose producer cannot absorb them, as an explicit ``Mul``.

A GELU output ``X`` has channels of very different ranges, which one per-tensor step serves badly, and no affine
precedes it to fold a per-channel factor into (``GELU(x) / r != GELU(x / r)``). With factors ``r > 0`` over its
channels (a group's :attr:`~nq_onnx.core.plan.GroupPlan.balance`), the float model is rewritten so that its layers
read ``X' = X * (1 / r)`` and compute the same outputs::

    X' = Mul(X, 1 / r)                      a new node before the group's quantizer
    Y  = X' (diag(r) W) + B                 every layer of the group, its weight's rows scaled

in the ``X @ W`` layout (``W`` is ``[K, N]``, ``r`` runs over ``K``): SmoothQuant's migration of the activation's
spread into the weights (Xiao et al., 2023), with the division made by the graph rather than folded into a
producer. NoisyQuant's noise, added later, is added to ``X'``. The rewrite is exact in real arithmetic; in float32 it
moves outputs by rounding only. A group is refused, with the reason, where a layer that reads it is not a linear
layer (an activation matmul has no constant weight to take ``r``). Every changed constant is a new one.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from nq_onnx.core import naming
from nq_onnx.passes.base import GraphPass, PassResult, Role, Skip, SkipKind, constant, nodes_by_name, replace_input
from nq_onnx.passes.find_layers import Layers, layers_kept
from nq_onnx.passes.reparam_layernorm import fold_into_layer


@dataclasses.dataclass(frozen=True)
class BalanceChannels(GraphPass):
    """``factors``: each group's ``r`` (float32, one per input channel), by group name. Layer specs found before the
    pass name the old weights: find the layers again on the rewritten graph."""

    layers: Layers
    factors: dict[str, np.ndarray]

    def __call__(self, graph: gs.Graph) -> PassResult:
        result = PassResult(graph)
        tensors, nodes = graph.tensors(), nodes_by_name(graph)
        for group in self.layers.groups:
            r = self.factors.get(group.name)
            if r is None:
                continue
            if not group.noisy:
                result.skipped.append(Skip(group.name, "read by an activation matmul, which has no weight to take "
                                           "the factors", SkipKind.UNSUPPORTED))
                continue
            if r.shape != (group.channels,) or not np.all(r > 0):
                result.skipped.append(Skip(group.name, f"needs {group.channels} positive factors",
                                           SkipKind.UNSUPPORTED))
                continue
            x = tensors[group.tensor]
            balanced = gs.Variable(naming.of(group.name, naming.BALANCED_INPUT), dtype=np.float32,
                                   shape=getattr(x, "shape", None))
            inverse = constant(naming.of(group.name, naming.BALANCE_FACTOR),
                               (1.0 / r.astype(np.float64)).astype(np.float32))
            mul = gs.Node("Mul", name=naming.of(group.name, naming.BALANCE_MUL), inputs=[x, inverse],
                          outputs=[balanced])
            graph.nodes.append(mul)
            for name in group.consumers:
                spec = self.layers.layer(name)
                replace_input(nodes[spec.node], x, balanced)
                fold_into_layer(graph, nodes, spec, r.astype(np.float64), np.zeros(group.channels))
            result.applied.append(group.name)
            result.record(Role.BALANCED, group.name)
        return result

    def ensures(self, graph: gs.Graph, result: PassResult) -> str | None:
        """Every layer the pass was given is still there, of the same kind: the layers found again match."""
        return layers_kept(graph, self.layers)
