"""Rewrite a weight ``Gemm`` as ``MatMul + Add`` so that onnxruntime can run it as an integer kernel.

onnxruntime fuses ``DQ -> MatMul`` with a float output into ``MatMulIntegerToFloat``, but ``DQ -> Gemm`` only
when the output is quantized too (``QGemm``); a quantized classifier head left as ``Gemm`` runs in float. For
``Gemm(X, W, C)`` with constant ``W``, ``transA = 0`` and 2-D ``X``::

    Y = alpha X op(W) + beta C      ->      Y = X W' + C'      W' = alpha op(W),  C' = beta C

(``op`` transposes when ``transB = 1``; a computed ``C`` is scaled by a ``Mul`` where ``beta != 1``). With ``alpha
= beta = 1`` (what exporters emit) the rewrite is exact. The ``MatMul`` keeps the ``Gemm``'s node name, so the
layer keeps its readable name (``head``).

``X`` is lifted to ``[M, 1, K]`` around the ``MatMul`` (``Unsqueeze`` before, ``Squeeze`` after the bias):
onnxruntime's ``MatMulAddFusion`` turns a 2-D ``MatMul + Add`` straight back into a ``Gemm`` before its QDQ
fusions run, which would leave the head in float again; a 3-D ``MatMul`` is not re-fused.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from nq_onnx.passes.base import GraphPass, PassResult, Role, Skip, constant


@dataclasses.dataclass(frozen=True)
class DecomposeGemm(GraphPass):
    def __call__(self, graph: gs.Graph) -> PassResult:
        result = PassResult(graph)
        for node in [n for n in graph.nodes if n.op == "Gemm"]:
            if not isinstance(node.inputs[1], gs.Constant) or node.attrs.get("transA", 0):
                result.skipped.append(Skip(node.name, "Gemm without a constant weight or with transA"))
                continue
            _decompose(graph, node)
            result.applied.append(node.name)
            result.record(Role.DECOMPOSED_GEMM, node.name)
        graph.cleanup().toposort()
        return result


    def ensures(self, graph: gs.Graph, result: PassResult) -> str | None:
        """No ``Gemm`` left but the ones skipped with a reason."""
        left = {n.name for n in graph.nodes if n.op == "Gemm"} - {skip.layer for skip in result.skipped}
        return f"Gemm {sorted(left)[0]!r} was neither decomposed nor skipped" if left else None

def _decompose(graph: gs.Graph, node: gs.Node) -> None:
    """``node`` rewritten in place as ``Unsqueeze -> MatMul [-> Add bias] -> Squeeze``; a computed ``C`` is added
    after the ``Squeeze`` (scaled by a ``Mul`` where ``beta != 1``)."""
    weight = node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    alpha = np.float32(node.attrs.get("alpha", 1.0))
    beta = np.float32(node.attrs.get("beta", 1.0))
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
    if isinstance(bias, gs.Constant):  # a bias: added in 3-D, where onnxruntime fuses it into the integer kernel
        if beta != 1:
            bias = constant(f"{node.name}/bias", (bias.values * beta).astype(np.float32))
        inner, y = y, gs.Variable(f"{node.name}/output_biased", dtype=np.float32)
        graph.nodes.append(gs.Node("Add", name=f"{node.name}_bias", inputs=[inner, bias], outputs=[y]))
        bias = None
    squeezed = gs.Variable(f"{node.name}/output_2d", dtype=np.float32) if bias is not None else out
    graph.nodes.append(gs.Node("Squeeze", name=f"{node.name}/unlift", inputs=[y, axes], outputs=[squeezed]))
    if bias is not None:  # a computed C ([M, N] or broadcastable to it) is added to the 2-D result
        if beta != 1:
            scaled = gs.Variable(f"{node.name}/c_scaled", dtype=np.float32)
            graph.nodes.append(gs.Node("Mul", name=f"{node.name}/scale_c",
                                       inputs=[bias, constant(f"{node.name}/beta", np.array(beta, np.float32))],
                                       outputs=[scaled]))
            bias = scaled
        graph.nodes.append(gs.Node("Add", name=f"{node.name}/add_c", inputs=[squeezed, bias], outputs=[out]))
