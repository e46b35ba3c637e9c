"""Give a bias-less quantized ``MatMul`` that feeds a ``Relu`` or ``Clip`` an explicit zero bias.

``Y = X W = X W + 0``, exactly. The reason is onnxruntime's graph optimizer (1.32, CPU): it fuses
``DQ(X) -> MatMul <- DQ(W)`` into ``MatMulIntegerToFloat``, but when the ``MatMul`` output goes straight into
a ``Relu`` (or ``Clip``) followed by a ``QuantizeLinear`` with a non-zero zero point it only tries
``QLinearMatMul`` with the activation folded into the ``Q``, fails, and leaves the ``MatMul`` in float.
``MatMul + Add`` fuses into ``MatMulIntegerToFloat`` with the ``Add`` as its bias input, so the zero costs
nothing there. Layers with a bias (or one added by ``fold_denoising_bias``) already have the ``Add``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from nq_onnx.core import naming
from nq_onnx.passes.base import GraphPass, PassResult, Role, consumers, constant, is_graph_output, nodes_by_name
from nq_onnx.passes.find_layers import ACT_MATMUL, Layers

ACTIVATIONS = ("Relu", "Clip")


@dataclasses.dataclass(frozen=True)
class AddZeroBias(GraphPass):
    layers: Layers

    def __call__(self, graph: gs.Graph) -> PassResult:
        result = PassResult(graph)
        nodes = nodes_by_name(graph)
        for spec in self.layers.layers:
            node = nodes.get(spec.node)
            if spec.kind == ACT_MATMUL or node is None or node.op != "MatMul":
                continue
            out = node.outputs[0]
            readers = consumers(graph, out)
            if is_graph_output(graph, out) or not any(r.op in ACTIVATIONS for r in readers):
                continue
            inner = gs.Variable(naming.of(spec.name, naming.MATMUL_OUT), dtype=out.dtype)
            node.outputs[0] = inner
            zero = constant(naming.of(spec.name, naming.ZERO_BIAS), np.zeros(spec.out_features, np.float32))
            graph.nodes.append(gs.Node("Add", name=naming.of(spec.name, naming.ADD_ZERO_BIAS), inputs=[inner, zero],
                                       outputs=[out]))
            result.applied.append(spec.name)
            result.record(Role.ZERO_BIAS, zero.name)
        return result
