"""Interleaved latency of several models: :mod:`nq_onnx.io.latency` (the benchmarks and ``nq-onnx sweep`` time
alike)."""

from nq_onnx.io.latency import latency_round_robin, session  # noqa: F401
