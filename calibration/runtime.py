"""onnxruntime sessions for calibration: the only place in nq-onnx that runs a model for statistics."""

from __future__ import annotations

import onnx
import onnxruntime as ort

from nq_onnx.core.errors import ModelError
from nq_onnx.core.external_data import configure_session


def session(model: onnx.ModelProto, *, optimize: bool = True, deploy: bool = False,
            threads: int = 0) -> ort.InferenceSession:
    """A CPU session: basic graph optimizations (float semantics kept, for statistics), none, or with ``deploy``
    every optimization a deployment gets (QDQ pairs fused into integer kernels: what a quantized model computes,
    and at its speed)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if deploy
        else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    configure_session(options, model)  # a light model: onnxruntime reads its large tensors from their files
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types per failure kind
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"onnxruntime cannot load the model: {first}") from None


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the float tensors ``names``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    existing = {o.name for o in out.graph.output}
    for name in names:
        if name not in existing:
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            existing.add(name)
    return out
