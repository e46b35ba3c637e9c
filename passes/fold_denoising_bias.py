"""Fold NoisyQuant's denoising bias (and a planned bias correction) into each layer's bias.

With noise ``N`` added to the layer input::

    Y = (X + N) dq(W_q) + B'          B' = B - N · dq(W_q) + C

so that without activation quantization and with no correction ``C`` the output is the weight-quantized layer's
(``C``: the layer's planned bias correction, :mod:`nq_onnx.techniques.bias_correction`; zero without one). ``B' - B``
is the layer's :attr:`~nq_onnx.core.quantized_layer.QuantizedLayer.bias_delta`, computed once in float64 from the
stored codes and steps and the same stored ``N`` that ``insert_noise`` adds. Given no layer values (a graph whose
weights stay float), the pass folds ``B - N W`` with the weight the graph holds, the same identity at
``dq(W_q) = W``. A bias initializer used by another node is copied, never edited in place (role ``BIAS_DENOISED``
either way); a layer without a bias gets an ``Add`` after its ``MatMul`` (role ``BIAS_ADDED``). The graph is in
canonical form: every layer is a ``MatMul``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from nq_onnx.core import naming
from nq_onnx.core.plan import Plan
from nq_onnx.core.quantized_layer import QuantizedLayer, bias_delta, folded_bias
from nq_onnx.passes.base import GraphPass, PassResult, Role, add_bias_after, constant, nodes_by_name
from nq_onnx.passes.find_layers import ACT_MATMUL, Layers, LayerSpec, const_value, require_matmul


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


@dataclasses.dataclass(frozen=True)
class FoldDenoisingBias(GraphPass):
    layers: Layers
    plan: Plan
    values: Mapping[str, QuantizedLayer] | None = None  # the quantized layers (passes.quantized_layers)

    def __call__(self, graph: gs.Graph) -> PassResult:
        result = PassResult(graph)
        nodes = nodes_by_name(graph)
        tensors = graph.tensors()
        for spec in self.layers.layers:
            delta = self._delta(spec, nodes)
            if delta is None:
                continue
            if spec.bias is not None:
                result.record(Role.BIAS_DENOISED, self._fold_into_bias(graph, tensors, nodes, spec, delta))
            else:
                result.record(Role.BIAS_ADDED, self._add_bias(graph, require_matmul(nodes[spec.node]), spec, delta))
            result.applied.append(spec.name)
        return result

    def _delta(self, spec: LayerSpec, nodes: dict) -> np.ndarray | None:
        """``-N dq(W) + C`` of the layer in float64, or ``None`` where it has neither noise nor a correction."""
        if spec.kind == ACT_MATMUL:
            return None
        if self.values is not None:
            value = self.values.get(spec.name)
            return None if value is None else value.bias_delta
        group = self.layers.group_of(spec.inputs[0])
        plan = self.plan.groups.get(group.name)
        noisy = plan is not None and plan.noise is not None and np.any(plan.noise) and group.noisy
        layer = self.plan.layers.get(spec.name)
        correction = layer.bias_correction if layer is not None else None
        if not noisy and correction is None:
            return None
        weight = effective_weight(require_matmul(nodes[spec.node]))
        return bias_delta(plan.noise.astype(np.float64) if noisy else None, weight,
                          None if correction is None else correction.astype(np.float64))

    @staticmethod
    def _fold_into_bias(graph: gs.Graph, tensors: dict, nodes: dict, spec: LayerSpec, delta: np.ndarray) -> str:
        bias = tensors[spec.bias]
        folded = folded_bias(bias.values, delta)
        owner = nodes[spec.bias_node]
        if len(bias.outputs) > 1 or any(out is bias for out in graph.outputs):
            copy = constant(naming.of(spec.name, naming.BIAS_DENOISED), folded)
            for i, tensor in enumerate(owner.inputs):
                if tensor is bias:
                    owner.inputs[i] = copy
            return copy.name
        bias.values = folded
        return bias.name

    @staticmethod
    def _add_bias(graph: gs.Graph, node: gs.Node, spec: LayerSpec, delta: np.ndarray) -> str:
        bias = constant(naming.of(spec.name, naming.BIAS_DENOISED), folded_bias(None, delta))
        add_bias_after(graph, node, spec.name, bias, naming.ADD_DENOISING_BIAS)
        return bias.name
