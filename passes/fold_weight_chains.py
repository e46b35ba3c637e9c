"""Fold constant chains in front of matrix-multiplication weights into plain constants.

Exporters and earlier tools often store a weight behind ops that only re-express a constant: the
deduplicating ``Identity``, ``Transpose(W^T)``, ``Cast`` (a float16 weight), or ``DequantizeLinear`` (an already
quantized model). For ``MatMul``/``Gemm`` input ``B = op(... op(C))`` with constant ``C`` this pass evaluates the
chain in numpy::

    Identity(C) = C      Transpose(C, perm) = C.transpose(perm)      Cast(C, to=float) = float(C)
    DequantizeLinear(q, s, z, axis) = (q - z) * s     (per-tensor or per-axis)

and feeds the layer the float32 result, so the layer is found and quantized afresh. Chains that read anything
computed are left alone.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from nq_onnx.passes.base import GraphPass, PassResult, Skip, constant, producer

FOLDABLE = ("Identity", "Transpose", "Cast", "DequantizeLinear")


def _evaluate(tensor: gs.Tensor, depth: int = 0) -> np.ndarray | None:
    if isinstance(tensor, gs.Constant):
        return tensor.values
    node = producer(tensor)
    if node is None or node.op not in FOLDABLE or depth > 16:
        return None
    args = [_evaluate(t, depth + 1) if t.name else None for t in node.inputs]
    if any(a is None for a in args[:1]) or (node.op == "DequantizeLinear" and any(a is None for a in args)):
        return None
    x = args[0]
    if node.op == "Identity":
        return x
    if node.op == "Transpose":
        return np.transpose(x, node.attrs.get("perm"))
    if node.op == "Cast":
        return x.astype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    scale = args[1].astype(np.float64)
    zero = args[2].astype(np.float64) if len(args) > 2 else np.zeros_like(scale)
    if scale.size > 1:
        shape = [1] * x.ndim
        shape[int(node.attrs.get("axis", 1))] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((x.astype(np.float64) - zero) * scale).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class FoldWeightChains(GraphPass):
    def __call__(self, graph: gs.Graph) -> PassResult:
        result = PassResult(graph)
        for node in graph.nodes:
            if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
                continue
            weight = node.inputs[1]
            if isinstance(weight, gs.Constant) or producer(weight) is None:
                continue
            value = _evaluate(weight)
            if value is None:
                continue
            if value.dtype.kind != "f":
                result.skipped.append(Skip(node.name, f"weight folds to {value.dtype}, not a float"))
                continue
            node.inputs[1] = constant(f"{node.name}/folded_weight", value.astype(np.float32))
            result.applied.append(node.name)
        if result.applied:
            graph.cleanup()
        return result
