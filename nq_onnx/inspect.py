"""``nq-onnx inspect``: which kernel onnxruntime really runs for each quantized layer.

A QDQ model is only fast if onnxruntime's graph optimizer fuses ``DQ -> MatMul`` into an integer kernel; a
layer it leaves as ``DequantizeLinear + MatMul`` runs in float and makes the "INT8" model slower than FP32.
This module loads the model with ``ORT_ENABLE_ALL`` on an execution provider, saves the optimized graph
(``optimized_model_filepath``) and maps every quantized matrix multiplication of the input model to the
node that replaced it. onnxruntime keeps the original node name on the fused kernel.

It also checks the arithmetic of every weight layer on CPUs it is not running on: int8 weight codes against
uint8 activation codes run on onnxruntime's U8S8 kernel, which on x86 without VNNI adds neighbouring products
into a saturating int16: the products of input channels ``(2i, 2i + 1)``, as its B packing pairs them
(:mod:`nq_onnx.core.quant`). A layer *can overflow* when :func:`quant.kernel_pair_sum_bound` of its stored weight
codes and the stored code range of its input (the ``Clip`` before the ``QuantizeLinear``, else the container's)
exceeds ``2^15 - 1``. The inspecting machine's CPU features are reported beside the kernels.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from nq_onnx.core import naming, quant
from nq_onnx.io.cpu import CpuFeatures, cpu_features
from nq_onnx.core.errors import ModelError
from nq_onnx.core.external_data import configure_session
from nq_onnx.io.model_io import load_model
from nq_onnx.passes.base import import_graph
from nq_onnx.passes.find_layers import const_value

INTEGER_KERNELS = frozenset(
    {
        "MatMulIntegerToFloat",
        "QLinearMatMul",
        "QGemm",
        "MatMulInteger",
        "DynamicQuantizeMatMul",
        "QAttention",
        "MatMulNBits",
        "QLinearConv",
        "ConvInteger",
    }
)


@dataclasses.dataclass(frozen=True)
class LayerKernel:
    layer: str
    node: str
    op: str  # the op in the input model: MatMul or Gemm
    kernel: str  # the op onnxruntime runs after optimization ("-" if the node is gone)
    has_weight: bool
    weight_dtype: str | None = None  # int8 or uint8 weight codes (None: an activation matmul)
    input_codes: tuple[int, int] | None = None  # stored code range of the activation input, e.g. (0, 255)
    pair_sum_bound: int | None = None  # largest |a_2i w_2i + a_2i+1 w_2i+1| the codes allow (int8 weights only)
    weight_bits: int | None = None  # the narrowest signed width holding every code - zero point (steps saturate)

    @property
    def integer(self) -> bool:
        return self.kernel in INTEGER_KERNELS

    @property
    def can_overflow(self) -> bool:
        """Whether a U8S8 kernel without VNNI can saturate on this layer's codes."""
        return self.pair_sum_bound is not None and self.pair_sum_bound > quant.INT16_MAX




@dataclasses.dataclass(frozen=True)
class Inspection:
    provider: str
    layers: tuple[LayerKernel, ...]
    noise_adds: int
    kernel_counts: dict[str, int]
    cpu: CpuFeatures
    select_ops: int = 0  # float selects feeding a quantizer (a twin-uniform quantizer's Where)
    qdq_problems: tuple[str, ...] = ()  # where Q/DQ break TensorRT's rules (gpu_rules)

    @property
    def weight_layers(self) -> list[LayerKernel]:
        return [k for k in self.layers if k.has_weight]

    @property
    def float_fallbacks(self) -> list[LayerKernel]:
        return [k for k in self.layers if not k.integer]

    @property
    def overflow_layers(self) -> list[LayerKernel]:
        """Layers whose codes can saturate a 16-bit pair sum on x86 without VNNI (wrong there, whatever runs here)."""
        return [k for k in self.layers if k.can_overflow]

    @property
    def weight_dtypes(self) -> dict[str, int]:
        """How many weight layers store their codes in each container (int8, uint8)."""
        counts: dict[str, int] = {}
        for k in self.weight_layers:
            counts[k.weight_dtype] = counts.get(k.weight_dtype, 0) + 1
        return counts

    @property
    def failures(self) -> list[LayerKernel]:
        """What ``--strict`` fails on: a float fallback, or codes that are not exact on every CPU."""
        return [k for k in self.layers if not k.integer or k.can_overflow]

    def to_dict(self) -> dict:
        return {
            "provider": self.provider,
            "cpu": self.cpu.to_dict(),
            "noise_adds": self.noise_adds,
            "kernel_counts": self.kernel_counts,
            "weight_layers": len(self.weight_layers),
            "weight_layers_integer": sum(k.integer for k in self.weight_layers),
            "layers_can_overflow_without_vnni": len(self.overflow_layers),
            "select_ops": self.select_ops,
            "layers": [dict(dataclasses.asdict(k), integer=k.integer, can_overflow=k.can_overflow)
                       for k in self.layers],
        }


def _producer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    node = tensor.inputs[0] if tensor.inputs else None
    return node if node is not None and node.op == op else None


def _constant(tensor: gs.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else const_value(tensor)


def stored_input_codes(dq: gs.Node) -> tuple[int, int] | None:
    """The stored code range of an activation ``DequantizeLinear``'s input: ``Clip -> QuantizeLinear`` bounds."""
    codes = dq.inputs[0]
    zp = _constant(dq.inputs[2]) if len(dq.inputs) > 2 else None
    dtype = np.dtype(zp.dtype if zp is not None else getattr(codes, "dtype", None) or np.uint8)
    if dtype not in (np.uint8, np.int8):
        return None
    info = np.iinfo(dtype)
    lo, hi = int(info.min), int(info.max)
    q = _producer(codes, "QuantizeLinear")
    clip = _producer(q.inputs[0], "Clip") if q is not None else None
    if q is None or clip is None or len(clip.inputs) < 3:
        return lo, hi
    scale, bounds = _constant(q.inputs[1]), [_constant(t) for t in clip.inputs[1:3]]
    if scale is None or scale.size != 1 or any(b is None for b in bounds):
        return lo, hi
    offset = int(zp.reshape(-1)[0]) if zp is not None else 0
    step = np.float32(scale.reshape(-1)[0])
    lo_c, hi_c = (int(np.clip(np.rint(np.float32(b.reshape(-1)[0]) / step) + offset, lo, hi)) for b in bounds)
    return lo_c, hi_c


def _weight_codes(dq: gs.Node) -> np.ndarray | None:
    """The stored codes of a constant weight ``DequantizeLinear`` as ``[K, N]`` (channels along its ``axis``)."""
    codes = _constant(dq.inputs[0])
    if codes is None or codes.ndim != 2:
        return None
    return codes if int(dq.attrs.get("axis", 1)) == 1 else codes.T


def _describe(node: gs.Node, dqs: list[gs.Node | None]) -> LayerKernel:
    """The layer read off the graph; ``kernel`` is filled in from the optimized graph later."""
    weight = next((dq for dq in dqs if dq is not None and _weight_codes(dq) is not None), None)
    act = next((dq for dq in dqs if dq is not None and dq is not weight), None)
    name = naming.owner(next(dq.outputs[0].name for dq in dqs if dq is not None))
    input_codes = stored_input_codes(act) if act is not None else None
    if weight is None:
        return LayerKernel(name, node.name, node.op, "", False, None, input_codes)
    codes = _weight_codes(weight)
    bound = None
    if codes.dtype == np.int8 and input_codes is not None and input_codes[0] >= 0:  # U8S8: uint8 activations
        bound = int(quant.kernel_pair_sum_bound(codes, *input_codes).max(initial=0))
    zp = _constant(weight.inputs[2]) if len(weight.inputs) > 2 else None
    centred = codes.astype(np.int32) - (zp.astype(np.int32).reshape(1, -1) if zp is not None else 0)
    hi, low = int(centred.max(initial=0)), int(centred.min(initial=0))
    bits = max(hi.bit_length(), (-low - 1).bit_length()) + 1  # the narrowest signed range [-2^(b-1), 2^(b-1) - 1]
    return LayerKernel(name, node.name, node.op, "", True, codes.dtype.name, input_codes, bound, bits)


def quantized_matmuls(model: onnx.ModelProto) -> list[LayerKernel]:
    """Every MatMul/Gemm that reads a ``DequantizeLinear`` output, with its codes (found by graph structure)."""
    graph = import_graph(model)
    out = []
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm"):
            continue
        dqs = [_producer(t, "DequantizeLinear") for t in node.inputs[:2]]
        if any(dq is not None for dq in dqs):
            out.append(_describe(node, dqs))
    return out


def optimized_graph(model: onnx.ModelProto, provider: str = "CPUExecutionProvider") -> onnx.ModelProto:
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        raise ModelError(
            f"execution provider {provider} is not available here "
            f"(available: {', '.join(ort.get_available_providers())})"
        )
    with tempfile.TemporaryDirectory(prefix="nq-inspect-") as folder:
        target = Path(folder) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(target)
        options.log_severity_level = 3
        if configure_session(options, model):  # large tensors stay in files, read and written by onnxruntime
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             "optimized.data")
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=[provider])
        except Exception as exc:  # onnxruntime raises its own exception types per failure kind
            raise ModelError(f"onnxruntime cannot load the model: {str(exc).strip().splitlines()[0]}") from None
        return onnx.load(str(target), load_external_data=False)  # only the kernels are looked at


def inspect_model(model: onnx.ModelProto, provider: str = "CPUExecutionProvider") -> Inspection:
    layers = quantized_matmuls(model)
    if not layers:
        raise ModelError("the model has no quantized layer (no MatMul/Gemm reading a DequantizeLinear output)")
    optimized = optimized_graph(model, provider)
    kernels = {n.name: n.op_type for n in optimized.graph.node}
    result = tuple(dataclasses.replace(k, kernel=kernels.get(k.node, "-")) for k in layers)
    counts: dict[str, int] = {}
    for k in result:
        counts[k.kernel] = counts.get(k.kernel, 0) + 1
    noise_adds = sum(1 for n in model.graph.node if naming.is_noise_add(n.name))
    selects = quantized_selects(model)
    return Inspection(provider, result, noise_adds, dict(sorted(counts.items())), cpu_features(), selects,
                      tuple(gpu_rules(model)))


def quantized_selects(model: onnx.ModelProto) -> int:
    """``Where`` nodes whose output a ``QuantizeLinear`` reads (directly or through its ``Clip``): a float select per
    element in front of a quantizer, as a twin-uniform quantizer's branches have (a ``Where`` elsewhere in the
    model is the float model's own)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def quantized(name: str, depth: int = 0) -> bool:
        return any(r.op_type == "QuantizeLinear" or (r.op_type == "Clip" and depth == 0 and quantized(r.output[0], 1))
                   for r in readers.get(name, []))

    return sum(1 for n in model.graph.node if n.op_type == "Where" and quantized(n.output[0]))


def gpu_rules(model: onnx.ModelProto) -> list[str]:
    """Where the model's Q/DQ break what TensorRT's explicit-quantization fusion expects: every ``QuantizeLinear``
    / ``DequantizeLinear`` int8 with zero point 0, and every ``DequantizeLinear`` read by a ``MatMul``/``Gemm``
    only (a dequantized tensor reaching a residual add or a LayerNorm stays unfused). Checked on the graph; it
    says nothing of TensorRT's own kernel choice."""
    problems = []
    graph = import_graph(model)
    for node in graph.nodes:
        if node.op not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp = _constant(node.inputs[2]) if len(node.inputs) > 2 else None
        if zp is None or zp.dtype != np.int8 or np.any(zp != 0):
            problems.append(f"{node.name}: {'uint8' if zp is None or zp.dtype != np.int8 else 'non-zero'} "
                            "zero point (TensorRT fuses int8 with zero point 0 only)")
        if node.op == "DequantizeLinear":
            readers = {r.op for out in node.outputs for r in out.outputs}
            if readers - {"MatMul", "Gemm"}:
                problems.append(f"{node.name}: read by {', '.join(sorted(readers - {'MatMul', 'Gemm'}))}")
    return problems


def target_failures(inspection: Inspection, target: str) -> list[str]:
    """Why a model does not suit ``target`` (:class:`nq_onnx.core.config.Target`'s values): a quantized layer left in
    float, a float select, int8 weight codes that can saturate on an x86 CPU without VNNI (``portable``,
    ``x86-avx2``), Q/DQ that TensorRT cannot fuse (``gpu``)."""
    out = [f"{k.layer}: runs {k.kernel}, not an integer kernel" for k in inspection.layers if not k.integer]
    if inspection.select_ops:
        out.append(f"{inspection.select_ops} float select ops (Where/Less: a twin-uniform quantizer)")
    if target in ("portable", "x86-avx2"):
        out += [f"{k.layer}: pair sums up to {k.pair_sum_bound} saturate int16 on x86 without VNNI"
                for k in inspection.overflow_layers]
    if target == "gpu":
        out += list(inspection.qdq_problems)
    return out


def inspect_file(path: str | Path, provider: str = "CPUExecutionProvider") -> Inspection:
    model, _ = load_model(path)
    return inspect_model(model, provider)


def format_inspection(inspection: Inspection, verbose: bool = True) -> str:
    weights = inspection.weight_layers
    integer = sum(k.integer for k in weights)
    lines = []
    cpu = inspection.cpu
    lines.append(f"CPU: {cpu.model or 'unknown model'} ({cpu.machine}; {cpu.kind}; "
                 f"flags: {' '.join(cpu.flags) or 'none found'})")
    if verbose:
        width = max(len(k.layer) for k in inspection.layers)
        lines.append(f"{'layer':<{width}}  {'op':<7}{'kernel':<22}{'weights':<9}{'w bits':<8}{'input codes':<13}")
        for k in inspection.layers:
            codes = f"[{k.input_codes[0]}, {k.input_codes[1]}]" if k.input_codes else "-"
            flag = "" if k.integer else "   <- float fallback"
            if k.can_overflow:
                flag += f"   <- pair sums up to {k.pair_sum_bound} overflow int16 without VNNI"
            bits = str(k.weight_bits) if k.weight_bits else "-"
            lines.append(f"{k.layer:<{width}}  {k.op:<7}{k.kernel:<22}{k.weight_dtype or '-':<9}{bits:<8}"
                         f"{codes:<13}{flag}")
    acts = [k for k in inspection.layers if not k.has_weight]
    lines.append(
        f"{inspection.provider}: {integer}/{len(weights)} weight matmuls and "
        f"{sum(k.integer for k in acts)}/{len(acts)} activation matmuls run as integer kernels; "
        f"{inspection.noise_adds} explicit noise Adds"
    )
    risky = inspection.overflow_layers
    if risky:
        where = "on this CPU too" if cpu.u8s8_saturates else "not on this CPU, but on x86 without VNNI"
        lines.append(f"{len(risky)} layers have int8 weight codes that can saturate 16-bit pair sums ({where}); "
                     "convert with --weight-dtype auto or uint8 to be exact on every CPU")
    else:
        lines.append("codes: exact on every CPU (no int8 weight layer can saturate a 16-bit pair sum)")
    return "\n".join(lines)
