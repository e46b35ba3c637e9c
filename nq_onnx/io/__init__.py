"""Models on disk and the machine that runs them: loading and atomically saving models (``model_io.py``), the
CPU's features and numpy's BLAS kernels (``cpu.py``), and timing a model against FP32 (``latency.py``). Imports
only :mod:`nq_onnx.core`."""
