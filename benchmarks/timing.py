"""Interleaved latency of several models: :mod:`nq_onnx.latency` (the benchmarks and ``nq-onnx sweep`` time alike)."""

from nq_onnx.latency import latency_round_robin, session  # noqa: F401
