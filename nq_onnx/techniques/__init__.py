"""Quantization techniques, one module each, registered in :mod:`nq_onnx.core.technique`; the built-in ones are
imported (and so registered) by :mod:`nq_onnx.techniques.builtin`."""
