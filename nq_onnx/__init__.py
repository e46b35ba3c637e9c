"""nq-onnx: NoisyQuant post-training quantization of vision transformers in ONNX.

import nq_onnx
result = nq_onnx.convert("model.onnx", "model.nq.onnx", calib="images/",
                         config=nq_onnx.QuantConfig(w_bits=6, a_bits=6))

The command line's other subcommands are modules reached from here, imported on first use (their dependencies,
torch for ``export`` and matplotlib for ``report``, are not loaded by ``import nq_onnx``):
``nq_onnx.export.export_timm``, ``nq_onnx.inspect.inspect_file`` and ``nq_onnx.report.build_report``.
"""

from typing import TYPE_CHECKING

from nq_onnx.core.version import __version__

if TYPE_CHECKING:  # what the names below resolve to, for type checkers and the API reference
    from nq_onnx.core.config import (Activations, Method, MixedSensitivity, NoiseMode, Objective, QuantConfig,
                                SearchConfig, Target, WeightDtype, WeightRounding)
    from nq_onnx.core.errors import ConfigError, DataError, ModelError, NQError, OutputError, PlanError
    from nq_onnx.pipeline import Result, Summary, convert, quantize
    from nq_onnx.core.plan import Plan

# the public names, each imported from its module on first use (PEP 562): importing a submodule (nq_onnx.core.quant,
# nq_onnx.passes.base) does not import the pipeline, and no module's import waits on the package's
_EXPORTS = {
    **{name: "nq_onnx.core.config" for name in ("Activations", "Method", "MixedSensitivity", "NoiseMode", "Objective",
                                           "QuantConfig", "SearchConfig", "Target", "WeightDtype", "WeightRounding")},
    **{name: "nq_onnx.core.errors" for name in ("ConfigError", "DataError", "ModelError", "NQError", "OutputError",
                                           "PlanError")},
    **{name: "nq_onnx.pipeline" for name in ("Result", "Summary", "convert", "quantize")},
    "Plan": "nq_onnx.core.plan",
}

# The public modules beside the names below: nq-onnx export, inspect and report as Python.
SUBMODULES = ("export", "inspect", "report")

__all__ = [
    "Activations",
    "ConfigError",
    "DataError",
    "Method",
    "MixedSensitivity",
    "ModelError",
    "NQError",
    "NoiseMode",
    "Objective",
    "OutputError",
    "Plan",
    "PlanError",
    "QuantConfig",
    "Result",
    "SearchConfig",
    "Summary",
    "Target",
    "WeightDtype",
    "WeightRounding",
    "convert",
    "quantize",
    "__version__",
]


def __getattr__(name: str):
    """A public name's value, or a public module (``export``, ``inspect``, ``report``), imported on first use."""
    import importlib

    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nq_onnx' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(SUBMODULES))
