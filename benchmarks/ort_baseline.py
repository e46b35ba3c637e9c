"""onnxruntime's own static quantizer, configured as strongly as a user would reasonably find it.

QDQ format, per-channel int8 weights, uint8 activations, MinMax calibration, after onnxruntime's recommended
``quant_pre_process`` (shape inference and graph optimization). Either on all default op types or on the
Linear layers only (``MatMul``/``Gemm``), which is the configuration that loses least on ViTs. ``weight_type``
``QUInt8`` is the "U8U8" format onnxruntime's documentation advises on x86 CPUs without VNNI, where its default
int8 weights saturate.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process


class _Reader(CalibrationDataReader):
    def __init__(self, name: str, arrays: np.ndarray, batch: int = 8):
        self._batches = iter([{name: arrays[i : i + batch]} for i in range(0, len(arrays), batch)])

    def get_next(self):
        return next(self._batches, None)


def quantize_with_onnxruntime(model: Path, out: Path, calib: np.ndarray, linear_only: bool,
                              weight_type: QuantType = QuantType.QInt8) -> None:
    import onnx

    name = onnx.load(str(model), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory() as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out),
            _Reader(name, calib),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=weight_type,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=["MatMul", "Gemm"] if linear_only else None,
        )
