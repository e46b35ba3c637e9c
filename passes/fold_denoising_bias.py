"""Fold NoisyQuant's denoising bias into each noisy layer's bias.

With noise ``N`` added to the layer input and the weight as the graph holds it (``dq(W_q)`` once weights
are quantized, ``W`` otherwise)::

    MatMul:  Y = (X + N) W + B'          B' = B - N · dq(W_q)
    Gemm:    Y = alpha (X + N) op(W) + beta C'      C' = C - (alpha / beta) · dq(W_q) · N   (op = transpose if transB)

so that without activation quantization the output is unchanged. ``B'`` is computed once, in float64, from
the same stored ``N`` that ``insert_noise`` adds. A bias initializer used by another node is copied, never
edited in place; a layer without a bias gets one (an ``Add`` after a ``MatMul``, input ``C`` of a ``Gemm``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from nq_onnx.plan import Plan
from nq_onnx.passes.base import PassResult, Skip, constant
from nq_onnx.passes.find_layers import Layers, LayerSpec, const_value


def effective_weight(node: gs.Node) -> np.ndarray:
    """The float weight a layer multiplies by: the constant, or ``scale * (codes - zero_point)`` of its DQ."""
    weight = node.inputs[1]
    value = const_value(weight)
    if value is not None:
        return value.astype(np.float64)
    dq = weight.inputs[0]
    codes, scale = dq.inputs[0].values, dq.inputs[1].values
    zero = dq.inputs[2].values if len(dq.inputs) > 2 else np.zeros_like(scale)
    shape = [1] * codes.ndim
    axis = dq.attrs.get("axis", 1)
    if scale.ndim == 1 and scale.size > 1:
        shape[axis] = -1
    return (codes.astype(np.float64) - zero.astype(np.float64).reshape(shape)) * scale.astype(np.float64).reshape(shape)


def denoising_delta(node: gs.Node, spec: LayerSpec, noise: np.ndarray) -> np.ndarray:
    """``-N · W`` in the layer's own layout and Gemm scaling (what must be added to the bias)."""
    w = effective_weight(node)
    n = noise.astype(np.float64)
    product = w @ n if spec.weight_axis == 0 else n @ w
    if spec.op == "Gemm":
        alpha = float(node.attrs.get("alpha", 1.0))
        beta = float(node.attrs.get("beta", 1.0)) if spec.bias else 1.0
        product = product * (alpha / beta)
    return -product


@dataclasses.dataclass(frozen=True)
class FoldDenoisingBias:
    layers: Layers
    plan: Plan

    def __call__(self, graph: gs.Graph) -> PassResult:
        result = PassResult(graph)
        nodes = {n.name: n for n in graph.nodes}
        tensors = graph.tensors()
        for group in self.layers.groups:
            plan = self.plan.groups.get(group.name)
            if plan is None or plan.noise is None or not np.any(plan.noise) or not group.noisy:
                continue
            for layer_name in group.consumers:
                spec = self.layers.layer(layer_name)
                node = nodes[spec.node]
                delta = denoising_delta(node, spec, plan.noise)
                if spec.bias is not None:
                    self._fold_into_bias(graph, tensors, nodes, spec, delta)
                else:
                    self._add_bias(graph, node, spec, delta)
                    result.skipped.append(Skip(spec.name, "had no bias; a bias was added for the denoising term"))
                result.applied.append(spec.name)
        return result

    @staticmethod
    def _fold_into_bias(graph: gs.Graph, tensors: dict, nodes: dict, spec: LayerSpec, delta: np.ndarray) -> None:
        bias = tensors[spec.bias]
        folded = (bias.values.astype(np.float64) + delta).astype(np.float32)
        owner = nodes[spec.bias_node]
        if len(bias.outputs) > 1 or any(out is bias for out in graph.outputs):
            copy = constant(f"{spec.name}/bias_denoised", folded)
            for i, tensor in enumerate(owner.inputs):
                if tensor is bias:
                    owner.inputs[i] = copy
        else:
            bias.values = folded

    @staticmethod
    def _add_bias(graph: gs.Graph, node: gs.Node, spec: LayerSpec, delta: np.ndarray) -> None:
        bias = constant(f"{spec.name}/bias_denoised", delta.astype(np.float32))
        if spec.op == "Gemm" and len(node.inputs) < 3:
            node.inputs.append(bias)
            node.attrs["beta"] = 1.0
            return
        out = node.outputs[0]
        inner = gs.Variable(f"{spec.name}/matmul_output", dtype=np.float32, shape=getattr(out, "shape", None))
        node.outputs[0] = inner
        graph.nodes.append(gs.Node("Add", name=f"{spec.name}/add_denoising_bias", inputs=[inner, bias], outputs=[out]))
