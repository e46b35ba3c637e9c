"""One error hierarchy for every user-facing failure.

The library raises these and never prints or exits; the CLI turns an :class:`NQError` into one line on
stderr and a non-zero exit status. Anything that is not an ``NQError`` is a bug and keeps its traceback.
"""

from __future__ import annotations


class NQError(Exception):
    """Root of every error that is the user's input, not our bug."""


class ConfigError(NQError):
    """A setting is outside what nq-onnx supports (bits, method, sizes, patterns)."""


class ModelError(NQError):
    """The ONNX model cannot be read, fails the checker, or has nothing we can quantize."""


class DataError(NQError):
    """Calibration or evaluation data is missing, unreadable or does not fit the model."""


class PlanError(NQError):
    """A saved plan is malformed, from another schema version, or belongs to another model."""


class OutputError(NQError):
    """An output path cannot be written (exists without --force, unwritable, disk full)."""


class PassConditionError(RuntimeError):
    """A graph pass met a graph it cannot take, or left one it promised not to (``GraphPass.requires`` /
    ``ensures``): a bug of nq-onnx, not the user's input, so not an :class:`NQError`."""
