"""Insert QuantizeLinear/DequantizeLinear pairs on weights and activations of the planned layers.

Weights (per output channel ``c``, axis 1 of a ``MatMul`` weight ``[K, N]``, axis ``1 - transB`` of a
``Gemm`` weight)::

    W  ->  DequantizeLinear(codes = q(W, s_c), s_c, zero_point 0, axis)              stored as int8, or
    W  ->  DequantizeLinear(codes = q(W, s_c) + 128, s_c, zero_point 128, axis)      stored as uint8

The two containers hold the same numbers; they differ in the kernel onnxruntime picks. int8 weights run on
U8S8 kernels, which on x86 without VNNI add pairs of ``u * w`` into a saturating int16; uint8 weights run on
exact U8U8 kernels. With ``weight_dtype = auto`` a layer is int8 only where :func:`quant.u8s8_safe` proves
that no pair sum of its codes and its input's stored code range ``[u_lo, u_hi]`` passes ``2^15 - 1``.

Activations (per tensor, one quantizer per group, one dequantizer per consumer)::

    X  ->  [Clip(X, -2^(b-1) s, (2^(b-1) - 1) s)]  ->  QuantizeLinear(s, zp 128, uint8)  ->  DequantizeLinear

The uint8 container with zero point 128 holds the signed b-bit codes ``q + 128`` (zero point 0 and codes
``[0, 2^b - 1]`` for a non-negative tensor planned unsigned); below 8 bits the explicit ``Clip`` keeps codes
inside the b-bit range, which the 8-bit container alone would not.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from nq_onnx import quant
from nq_onnx.config import WeightDtype
from nq_onnx.plan import Plan
from nq_onnx.passes.base import PassResult, Skip, constant
from nq_onnx.passes.find_layers import ACT_MATMUL, Layers, LayerSpec


@dataclasses.dataclass(frozen=True)
class InsertQDQ:
    layers: Layers
    plan: Plan

    def __call__(self, graph: gs.Graph) -> PassResult:
        result = PassResult(graph)
        nodes = {n.name: n for n in graph.nodes}
        for spec in self.layers.layers:
            plan = self.plan.layers.get(spec.name)
            if plan is None:
                result.skipped.append(Skip(spec.name, "not in the plan"))
                continue
            if spec.kind != ACT_MATMUL:
                as_uint8 = self._quantize_weight(graph, nodes[spec.node], spec, plan.weight_scales, plan.bits,
                                                 self._input_codes(spec))
                result.roles.setdefault("uint8_weights" if as_uint8 else "int8_weights", []).append(spec.name)
            result.applied.append(spec.name)
        for group in self.layers.groups:
            plan = self.plan.groups.get(group.name)
            if plan is None:
                continue
            consumers = [self.layers.layer(name) for name in group.consumers]
            self._quantize_activation(
                graph, nodes, group.name, group.tensor, consumers, plan.scale, plan.bits, plan.signed
            )
        return result

    def _input_codes(self, spec: LayerSpec) -> tuple[int, bool]:
        """``(bits, signed)`` of the layer's input quantizer (a layer whose input is not planned: 8-bit signed)."""
        group = self.plan.groups.get(self.layers.group_of(spec.inputs[0]).name)
        return (group.bits, group.signed) if group is not None else (8, True)

    def _as_uint8(self, codes: np.ndarray, axis: int, input_codes: tuple[int, bool]) -> bool:
        dtype = self.plan.config.weight_dtype
        if dtype != WeightDtype.AUTO:
            return dtype == WeightDtype.UINT8
        return not quant.u8s8_safe(codes if axis == 1 else codes.T, *input_codes)

    def _quantize_weight(self, graph: gs.Graph, node: gs.Node, spec: LayerSpec, scales: np.ndarray, bits: int,
                         input_codes: tuple[int, bool]) -> bool:
        """Replace the weight by its dequantized codes; returns whether they are stored as uint8."""
        weight = node.inputs[1]
        codes = quant.quantize_weight(weight.values, scales, spec.weight_axis, bits)
        as_uint8 = self._as_uint8(codes, spec.weight_axis, input_codes)
        stored, zero_points = quant.store_weight(codes, spec.weight_axis, as_uint8)
        dequantized = gs.Variable(f"{spec.name}/weight_dequantized", dtype=np.float32, shape=list(codes.shape))
        graph.nodes.append(
            gs.Node(
                "DequantizeLinear",
                name=f"{spec.name}/weight_dequantize",
                attrs={"axis": spec.weight_axis},
                inputs=[
                    constant(f"{spec.name}/weight_quantized", stored),
                    constant(f"{spec.name}/weight_scale", scales.astype(np.float32)),
                    constant(f"{spec.name}/weight_zero_point", zero_points),
                ],
                outputs=[dequantized],
            )
        )
        node.inputs[1] = dequantized
        return as_uint8

    @staticmethod
    def _quantize_activation(
        graph: gs.Graph,
        nodes: dict[str, gs.Node],
        name: str,
        tensor: str,
        consumers: list[LayerSpec],
        scale: float,
        bits: int,
        signed: bool,
    ) -> None:
        first = consumers[0]
        source = nodes[first.node].inputs[first.inputs.index(tensor)]
        scale32 = np.float32(scale)
        if bits < 8:
            lo, hi = quant.code_range(bits, signed)
            clipped = gs.Variable(f"{name}/input_clipped", dtype=np.float32, shape=getattr(source, "shape", None))
            graph.nodes.append(
                gs.Node(
                    "Clip",
                    name=f"{name}/input_clip",
                    inputs=[
                        source,
                        constant(f"{name}/input_clip_min", np.array(lo * scale32, np.float32)),
                        constant(f"{name}/input_clip_max", np.array(hi * scale32, np.float32)),
                    ],
                    outputs=[clipped],
                )
            )
            source_q = clipped
        else:
            source_q = source
        codes = gs.Variable(f"{name}/input_quantized", dtype=np.uint8, shape=getattr(source, "shape", None))
        scale_c = constant(f"{name}/input_scale", np.array(scale32, np.float32))
        zero_c = constant(f"{name}/input_zero_point", np.array(quant.zero_point(signed), np.uint8))
        graph.nodes.append(
            gs.Node(
                "QuantizeLinear", name=f"{name}/input_quantize", inputs=[source_q, scale_c, zero_c], outputs=[codes]
            )
        )
        for spec in consumers:
            node = nodes[spec.node]
            index = spec.inputs.index(tensor)
            suffix = f"input{index}_dequantize" if spec.kind == ACT_MATMUL else "input_dequantize"
            out = gs.Variable(f"{spec.name}/{suffix}d", dtype=np.float32, shape=getattr(source, "shape", None))
            graph.nodes.append(
                gs.Node(
                    "DequantizeLinear", name=f"{spec.name}/{suffix}", inputs=[codes, scale_c, zero_c], outputs=[out]
                )
            )
            node.inputs[index] = out
