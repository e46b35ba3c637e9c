"""nq-onnx: NoisyQuant post-training quantization of vision transformers in ONNX.

import nq_onnx
result = nq_onnx.convert("model.onnx", "model.nq.onnx", calib="images/",
                         config=nq_onnx.QuantConfig(w_bits=6, a_bits=6))
"""

from typing import TYPE_CHECKING

from nq_onnx._version import __version__

if TYPE_CHECKING:  # what the names below resolve to, for type checkers and the API reference
    from nq_onnx.config import Method, QuantConfig, SearchConfig
    from nq_onnx.errors import ConfigError, DataError, ModelError, NQError, OutputError, PlanError
    from nq_onnx.pipeline import Result, Summary, convert, quantize
    from nq_onnx.plan import Plan

# the public names, each imported from its module on first use (PEP 562): importing a submodule (nq_onnx.quant,
# nq_onnx.passes.base) does not import the pipeline, and no module's import waits on the package's
_EXPORTS = {
    "Method": "nq_onnx.config",
    "QuantConfig": "nq_onnx.config",
    "SearchConfig": "nq_onnx.config",
    "ConfigError": "nq_onnx.errors",
    "DataError": "nq_onnx.errors",
    "ModelError": "nq_onnx.errors",
    "NQError": "nq_onnx.errors",
    "OutputError": "nq_onnx.errors",
    "PlanError": "nq_onnx.errors",
    "Result": "nq_onnx.pipeline",
    "Summary": "nq_onnx.pipeline",
    "convert": "nq_onnx.pipeline",
    "quantize": "nq_onnx.pipeline",
    "Plan": "nq_onnx.plan",
}

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


def __getattr__(name: str):
    """A public name's value, imported from its module on first use and kept."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nq_onnx' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
