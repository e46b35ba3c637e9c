"""Insert NoisyQuant's fixed noisy bias before the activation quantizer of each noisy group.

For an activation group reading ``X`` with stored noise vector ``N`` (one value per input channel, the last
axis of ``X``)::

    X  ->  X + N  ->  (quantizer)  ->  every linear layer of the group

``N`` broadcasts along the last axis. Layers outside the group still read ``X`` unchanged. A group whose
plan has no noise or an all-zero ``N`` is left as it is, so zero noise gives exactly the plain QDQ graph.
Pair this pass with ``fold_denoising_bias``: together, without quantization, they leave outputs unchanged.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from nq_onnx.plan import Plan
from nq_onnx.passes.base import PassResult, Skip, constant, replace_input
from nq_onnx.passes.find_layers import Layers


@dataclasses.dataclass(frozen=True)
class InsertNoise:
    layers: Layers
    plan: Plan

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
            noisy = gs.Variable(f"{group.name}/noisy_input", dtype=np.float32, shape=getattr(x, "shape", None))
            noise = constant(f"{group.name}/noise", plan.noise.astype(np.float32))
            graph.nodes.append(gs.Node("Add", name=f"{group.name}/add_noise", inputs=[x, noise], outputs=[noisy]))
            for layer_name in group.consumers:
                replace_input(nodes[self.layers.layer(layer_name).node], x, noisy)
            result.applied.append(group.name)
        return result
