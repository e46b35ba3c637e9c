"""``nq-onnx inspect``: which kernel onnxruntime really runs for each quantized layer.

A QDQ model is only fast if onnxruntime's graph optimizer fuses ``DQ -> MatMul`` into an integer kernel; a
layer it leaves as ``DequantizeLinear + MatMul`` runs in float and makes the "INT8" model slower than FP32.
This module loads the model with ``ORT_ENABLE_ALL`` on an execution provider, saves the optimized graph
(``optimized_model_filepath``) and maps every quantized matrix multiplication of the input model to the
node that replaced it. onnxruntime keeps the original node name on the fused kernel.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import onnx

from nq_onnx.errors import ModelError
from nq_onnx.external_data import configure_session
from nq_onnx.model_io import load_model

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
DQ_SUFFIXES = ("/weight_dequantized", "/input_dequantized", "/input0_dequantized", "/input1_dequantized")


@dataclasses.dataclass(frozen=True)
class LayerKernel:
    layer: str
    node: str
    op: str  # the op in the input model: MatMul or Gemm
    kernel: str  # the op onnxruntime runs after optimization ("-" if the node is gone)
    has_weight: bool

    @property
    def integer(self) -> bool:
        return self.kernel in INTEGER_KERNELS


@dataclasses.dataclass(frozen=True)
class Inspection:
    provider: str
    layers: tuple[LayerKernel, ...]
    noise_adds: int
    kernel_counts: dict[str, int]

    @property
    def weight_layers(self) -> list[LayerKernel]:
        return [k for k in self.layers if k.has_weight]

    @property
    def float_fallbacks(self) -> list[LayerKernel]:
        return [k for k in self.layers if not k.integer]

    def to_dict(self) -> dict:
        return {
            "provider": self.provider,
            "noise_adds": self.noise_adds,
            "kernel_counts": self.kernel_counts,
            "weight_layers": len(self.weight_layers),
            "weight_layers_integer": sum(k.integer for k in self.weight_layers),
            "layers": [dict(dataclasses.asdict(k), integer=k.integer) for k in self.layers],
        }


def quantized_layers(model: onnx.ModelProto) -> list[tuple[str, onnx.NodeProto, bool]]:
    """``(layer, node, has_weight)`` for every MatMul/Gemm reading a dequantized tensor (nq-onnx naming)."""
    out = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        sources = [name for name in node.input[:2] if name.endswith(DQ_SUFFIXES)]
        if not sources:
            continue
        layer = sources[0].rsplit("/", 1)[0]
        out.append((layer, node, any(s.endswith("/weight_dequantized") for s in node.input[:2])))
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
    layers = quantized_layers(model)
    if not layers:
        raise ModelError(
            "the model has no nq-onnx quantized layer (no MatMul/Gemm reading a */weight_dequantized "
            "or */input_dequantized tensor)"
        )
    optimized = optimized_graph(model, provider)
    kernels = {n.name: n.op_type for n in optimized.graph.node}
    result = tuple(
        LayerKernel(layer, node.name, node.op_type, kernels.get(node.name, "-"), weight)
        for layer, node, weight in layers
    )
    counts: dict[str, int] = {}
    for k in result:
        counts[k.kernel] = counts.get(k.kernel, 0) + 1
    noise_adds = sum(1 for n in model.graph.node if n.name.endswith("/add_noise"))
    return Inspection(provider, result, noise_adds, dict(sorted(counts.items())))


def inspect_file(path: str | Path, provider: str = "CPUExecutionProvider") -> Inspection:
    model, _ = load_model(path)
    return inspect_model(model, provider)


def format_inspection(inspection: Inspection, verbose: bool = True) -> str:
    weights = inspection.weight_layers
    integer = sum(k.integer for k in weights)
    lines = []
    if verbose:
        width = max(len(k.layer) for k in inspection.layers)
        lines.append(f"{'layer':<{width}}  {'op':<7}{'kernel':<22}")
        for k in inspection.layers:
            flag = "" if k.integer else "   <- float fallback"
            lines.append(f"{k.layer:<{width}}  {k.op:<7}{k.kernel:<22}{flag}")
    acts = [k for k in inspection.layers if not k.has_weight]
    lines.append(
        f"{inspection.provider}: {integer}/{len(weights)} weight matmuls and "
        f"{sum(k.integer for k in acts)}/{len(acts)} activation matmuls run as integer kernels; "
        f"{inspection.noise_adds} explicit noise Adds"
    )
    return "\n".join(lines)
