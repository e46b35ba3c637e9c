"""Insert QuantizeLinear/DequantizeLinear pairs on weights and activations of the planned layers.

Weights (per output channel ``c``, axis 1 of the ``MatMul`` weight ``[K, N]``; ``canonicalize`` has turned
every weight ``Gemm`` into one)::

    W  ->  DequantizeLinear(codes = q(W, s_c), s_c, zero_point 0, axis)              stored as int8, or
    W  ->  DequantizeLinear(codes = q(W, s_c) + 128, s_c, zero_point 128, axis)      stored as uint8

(``q(W, s_c)`` the nearest codes, or the plan's own codes where it holds them: GPTQ's), read from each layer's
:class:`~nq_onnx.core.quantized_layer.QuantizedLayer` (:func:`nq_onnx.passes.quantized_layers.quantized_layers`),
which also chose the container. The two containers hold the same numbers; they differ in the kernel onnxruntime
picks. int8 weights run on U8S8 kernels, which on x86 without VNNI add pairs of ``u * w`` into a saturating int16;
uint8 weights run on exact U8U8 kernels.

Activations (per tensor, one quantizer per group, one dequantizer per consumer)::

    X  ->  [Clip(X, -2^(b-1) s, (2^(b-1) - 1) s)]  ->  QuantizeLinear(s, zp 128, uint8)  ->  DequantizeLinear

The uint8 container with zero point 128 holds the signed b-bit codes ``q + 128`` (zero point 0 and codes
``[0, 2^b - 1]`` for a non-negative tensor planned unsigned); below 8 bits the explicit ``Clip`` keeps codes
inside the b-bit range, which the 8-bit container alone would not. A group planned twin-uniform (PTQ4ViT) turns
each of its layers into two branches (:class:`~nq_onnx.core.two_range.TwinUniformQuantizer`). The arithmetic is
:class:`~nq_onnx.core.quantizers.ActQuantizer`'s and :class:`~nq_onnx.core.quantizers.WeightQuantizer`'s, the same
objects the search and the simulation use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import onnx_graphsurgeon as gs

from nq_onnx.core.config import Target
from nq_onnx.core.plan import Plan
from nq_onnx.core.quantized_layer import QuantizedLayer
from nq_onnx.core.quantizers import ActQuantizer, WeightQuantizer
from nq_onnx.passes.base import GraphPass, PassResult, Role, Skip, SkipKind, nodes_by_name
from nq_onnx.passes.find_layers import ACT_MATMUL, Layers, require_matmul
from nq_onnx.passes.quantized_layers import quantized_layers


@dataclasses.dataclass(frozen=True)
class InsertQDQ(GraphPass):
    layers: Layers
    plan: Plan
    values: Mapping[str, QuantizedLayer] | None = None  # built from ``graph`` when not given

    def __call__(self, graph: gs.Graph) -> PassResult:
        result = PassResult(graph)
        nodes = nodes_by_name(graph)
        values = self.values if self.values is not None else quantized_layers(graph, self.layers, self.plan)
        for spec in self.layers.layers:
            plan = self.plan.layers.get(spec.name)
            if plan is None:
                result.skipped.append(Skip(spec.name, "not in the plan", SkipKind.NOT_PLANNED))
                continue
            if spec.kind != ACT_MATMUL:
                value = values[spec.name]
                require_matmul(nodes[spec.node]).inputs[1] = WeightQuantizer.emit(graph, value)
                result.record(Role.UINT8_WEIGHTS if value.as_uint8 else Role.INT8_WEIGHTS, spec.name)
            result.applied.append(spec.name)
        twins = []
        for group in self.layers.groups:
            plan = self.plan.groups.get(group.name)
            if plan is None:
                continue
            if plan.twin is not None:  # after every other input: its branches copy the consumer's other input
                twins.append((group, plan))
                continue
            first = self.layers.layer(group.consumers[0])
            source = nodes[first.node].inputs[first.inputs.index(group.tensor)]
            quantized = self._storage(plan.quantizer()).emit(graph, group.name, source, plan.scale)
            result.record(Role.ACT_QUANTIZER, quantized.codes.inputs[0].name)
            for spec in (self.layers.layer(name) for name in group.consumers):
                index = spec.inputs.index(group.tensor)
                nodes[spec.node].inputs[index] = ActQuantizer.emit_dequantize(
                    graph, quantized, spec.name, index if spec.kind == ACT_MATMUL else None)
        for group, plan in twins:
            for spec in (self.layers.layer(name) for name in group.consumers):
                plan.quantizer().emit_matmul(graph, nodes[spec.node], spec.inputs.index(group.tensor), plan.scale,
                                             spec.name)
                result.record(Role.TWIN_QUANTIZER, spec.name)
        return result

    def requires(self, graph: gs.Graph) -> str | None:
        """Canonical form: every planned weight layer a ``MatMul`` whose weight is a float constant."""
        nodes = nodes_by_name(graph)
        for spec in self.layers.layers:
            if spec.kind == ACT_MATMUL or spec.name not in self.plan.layers:
                continue
            node = nodes.get(spec.node)
            if node is None or node.op != "MatMul" or not isinstance(node.inputs[1], gs.Constant):
                return f"layer {spec.name!r} is not a MatMul with a constant weight (canonicalize the model first)"
        return None

    def ensures(self, graph: gs.Graph, result: PassResult) -> str | None:
        """Every applied layer multiplies dequantized weights, and every reader of a uniform group dequantized codes."""
        nodes, twins = nodes_by_name(graph), set(result.names(Role.TWIN_QUANTIZER))
        reads = []
        for name in (n for n in result.applied if n not in twins):
            spec = self.layers.layer(name)
            if spec.kind != ACT_MATMUL:
                reads.append((name, "its weight", nodes[spec.node].inputs[1]))
        for group in self.layers.groups:
            plan = self.plan.groups.get(group.name)
            for spec in (self.layers.layer(n) for n in group.consumers if plan is not None and plan.twin is None):
                tensor = nodes[spec.node].inputs[spec.inputs.index(group.tensor)]
                reads.append((spec.name, f"group {group.name!r}", tensor))
        for layer, what, tensor in reads:
            if not tensor.inputs or tensor.inputs[0].op != "DequantizeLinear":
                return f"layer {layer!r} reads {what} without a DequantizeLinear"
        return None

    def _storage(self, quantizer: ActQuantizer) -> ActQuantizer:
        """The quantizer as the target stores it: symmetric codes as int8 with zero point 0 for ``gpu``."""
        if self.plan.config.target == Target.GPU and quantizer.signed and not quantizer.asymmetric:
            return dataclasses.replace(quantizer, int8=True)
        return quantizer
