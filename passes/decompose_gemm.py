"""Rewrite a weight ``Gemm`` as ``MatMul + Add`` so that onnxruntime can run it as an integer kernel.

onnxruntime fuses ``DQ -> MatMul`` with a float output into ``MatMulIntegerToFloat``, but ``DQ -> Gemm`` only
when the output is quantized too (``QGemm``); a quantized classifier head left as ``Gemm`` runs in float. For
``Gemm(X, W, C)`` with constant ``W``, ``transA = 0`` and 2-D ``X``::

    Y = alpha X op(W) + beta C      ->      Y = X W' + C'      W' = alpha op(W),  C' = beta C

(``op`` transposes when ``transB = 1``). With ``alpha = beta = 1`` (what exporters emit) the rewrite is exact.
The ``MatMul`` keeps the ``Gemm``'s node name, so the layer keeps its readable name (``head``).

``X`` is lifted to ``[M, 1, K]`` around the ``MatMul`` (``Unsqueeze`` before, ``Squeeze`` after the bias):
onnxruntime's ``MatMulAddFusion`` turns a 2-D ``MatMul + Add`` straight back into a ``Gemm`` before its QDQ
fusions run, which would leave the head in float again; a 3-D ``MatMul`` is not re-fused.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from nq_onnx.passes.base import PassResult, Skip, constant


@dataclasses.dataclass(frozen=True)
class DecomposeGemm:
    def __call__(self, graph: gs.Graph) -> PassResult:
        result = PassResult(graph)
        for node in [n for n in graph.nodes if n.op == "Gemm"]:
            weight = node.inputs[1]
            if not isinstance(weight, gs.Constant) or node.attrs.get("transA", 0):
                result.skipped.append(Skip(node.name, "Gemm without a constant weight or with transA"))
                continue
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            alpha = np.float32(node.attrs.get("alpha", 1.0))
            beta = np.float32(node.attrs.get("beta", 1.0))
            if bias is not None and not isinstance(bias, gs.Constant) and beta != 1:
                result.skipped.append(Skip(node.name, "Gemm with a computed C and beta != 1"))
                continue
            w = weight.values.T if node.attrs.get("transB", 0) else weight.values
            w = np.ascontiguousarray(w * alpha, dtype=np.float32)
            out = node.outputs[0]
            node.op, node.attrs = "MatMul", {}
            x = node.inputs[0]
            axes = constant(f"{node.name}/axes", np.array([1], np.int64))
            lifted = gs.Variable(f"{node.name}/input_3d", dtype=np.float32)
            graph.nodes.append(gs.Node("Unsqueeze", name=f"{node.name}/lift", inputs=[x, axes], outputs=[lifted]))
            node.inputs.clear()
            node.inputs.extend([lifted, constant(f"{node.name}/weight", w)])
            y = gs.Variable(f"{node.name}/output_3d", dtype=np.float32)
            node.outputs[0] = y
            if bias is not None:
                if isinstance(bias, gs.Constant) and beta != 1:
                    bias = constant(f"{node.name}/bias", (bias.values * beta).astype(np.float32))
                inner, y = y, gs.Variable(f"{node.name}/output_biased", dtype=np.float32)
                graph.nodes.append(gs.Node("Add", name=f"{node.name}_bias", inputs=[inner, bias], outputs=[y]))
            graph.nodes.append(gs.Node("Squeeze", name=f"{node.name}/unlift", inputs=[y, axes], outputs=[out]))
            result.applied.append(node.name)
        graph.cleanup().toposort()
        return result
