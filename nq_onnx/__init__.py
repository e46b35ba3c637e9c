"""nq-onnx: NoisyQuant post-training quantization of vision transformers in ONNX.

import nq_onnx
result = nq_onnx.convert("model.onnx", "model.nq.onnx", calib="images/",
                         config=nq_onnx.QuantConfig(w_bits=6, a_bits=6))

The command line's other subcommands are modules reached from here, imported on first use (their dependencies,
torch for ``export`` and matplotlib for ``report``, are not loaded by ``import nq_onnx``):
``nq_onnx.export.export_timm``, ``nq_onnx.inspect.inspect_file`` and ``nq_onnx.report.build_report``.
"""

import importlib

from nq_onnx._version import __version__
from nq_onnx.config import (  # noqa: E402
    Activations,
    Method,
    MixedSensitivity,
    NoiseMode,
    Objective,
    QuantConfig,
    SearchConfig,
    Target,
    WeightDtype,
    WeightRounding,
)
from nq_onnx.errors import ConfigError, DataError, ModelError, NQError, OutputError, PlanError  # noqa: E402
from nq_onnx.pipeline import Result, Summary, convert, quantize  # noqa: E402
from nq_onnx.plan import Plan  # noqa: E402

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
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(SUBMODULES))
