"""nq-onnx: NoisyQuant post-training quantization of vision transformers in ONNX.

import nq_onnx
result = nq_onnx.convert("model.onnx", "model.nq.onnx", calib="images/",
                         config=nq_onnx.QuantConfig(w_bits=6, a_bits=6))
"""

from nq_onnx._version import __version__
from nq_onnx.config import Method, QuantConfig, SearchConfig  # noqa: E402
from nq_onnx.errors import ConfigError, DataError, ModelError, NQError, OutputError, PlanError  # noqa: E402
from nq_onnx.pipeline import Result, Summary, convert, quantize  # noqa: E402
from nq_onnx.plan import Plan  # noqa: E402

__all__ = [
    "ConfigError",
    "DataError",
    "Method",
    "ModelError",
    "NQError",
    "OutputError",
    "Plan",
    "PlanError",
    "QuantConfig",
    "Result",
    "SearchConfig",
    "Summary",
    "convert",
    "quantize",
    "__version__",
]
