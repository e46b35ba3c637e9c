"""Build each planned linear layer's :class:`~nq_onnx.core.quantized_layer.QuantizedLayer` once, from the float graph.

For a layer with weight ``W`` (``[K, N]``, the ``MatMul``'s second input in canonical form) and plan steps ``s_c``:
the codes are the plan's own (GPTQ) or ``round(W / s_c)`` clipped to the plan's width (and, with ``int8-paired``
storage, to the kernel pairs' limit); the noise is the input group's ``N`` where the group takes noise (a linear
layer's input, planned with a non-zero ``N``). The storage is int8 with ``int8-paired`` (whose kernel pair sums
against the input's stored code range ``[u_lo, u_hi]`` are checked to stay within ``2^15 - 1``:
:func:`nq_onnx.core.quant.kernel_pair_sum_bound`), uint8 ``q + 128`` unless the plan's ``weight_dtype`` says int8,
or, with ``auto``, unless :func:`nq_onnx.core.quant.u8s8_safe` proves that no two codes of a column can pass
``2^15 - 1`` whatever the kernel pairs (then int8, which is as exact and the faster kernel). Runs no model.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from nq_onnx.core import quant
from nq_onnx.core.config import WeightDtype
from nq_onnx.core.errors import PlanError
from nq_onnx.core.plan import Plan
from nq_onnx.core.quantized_layer import QuantizedLayer
from nq_onnx.core.quantizers import ActQuantizer
from nq_onnx.passes.base import nodes_by_name
from nq_onnx.passes.find_layers import ACT_MATMUL, Layers, LayerSpec, require_matmul


def quantized_layers(graph: gs.Graph, layers: Layers, plan: Plan) -> dict[str, QuantizedLayer]:
    """Every planned weight layer of ``graph`` (float weights as constants) by name, as the model will hold it."""
    nodes = nodes_by_name(graph)
    out = {}
    for spec in layers.layers:
        layer = plan.layers.get(spec.name)
        if layer is None or spec.kind == ACT_MATMUL:
            continue
        codes = layer.codes(require_matmul(nodes[spec.node]).inputs[1].values, plan.config.weight_pair_limit)
        out[spec.name] = QuantizedLayer(
            spec.name, codes, np.asarray(layer.weight_scales, np.float32),
            _as_uint8(plan, codes, input_quantizer(layers, plan, spec)), _noise(layers, plan, spec),
            layer.bias_correction)
    return out


def input_quantizer(layers: Layers, plan: Plan, spec: LayerSpec) -> ActQuantizer:
    """The quantizer of the layer's input (a layer whose input is not planned: 8-bit signed; a twin-uniform group:
    its uniform branch's codes)."""
    group = plan.groups.get(layers.group_of(spec.inputs[0]).name)
    if group is None:
        return ActQuantizer(8)
    return group.quantizer() if group.twin is None else ActQuantizer(group.bits, group.signed)


def _as_uint8(plan: Plan, codes_kn: np.ndarray, act: ActQuantizer) -> bool:
    dtype = plan.config.weight_dtype
    if dtype == WeightDtype.INT8_PAIRED:
        bound = int(quant.kernel_pair_sum_bound(codes_kn, *act.stored_range).max(initial=0))
        if bound > quant.INT16_MAX:  # the quantizers keep the limit: a plan whose codes do not is not this config's
            raise PlanError(f"weight codes pair up to {bound} against the input's codes, over int16: the plan's "
                            "codes do not keep int8-paired storage's limit")
        return False
    if dtype != WeightDtype.AUTO:
        return dtype == WeightDtype.UINT8
    return not quant.u8s8_safe(codes_kn, act.stored_range)


def _noise(layers: Layers, plan: Plan, spec: LayerSpec) -> np.ndarray | None:
    group = layers.group_of(spec.inputs[0])
    planned = plan.groups.get(group.name)
    if planned is None or planned.noise is None or not np.any(planned.noise) or not group.noisy:
        return None
    return planned.noise
