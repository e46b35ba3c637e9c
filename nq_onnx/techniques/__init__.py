"""Quantization techniques, one module each, registered in :mod:`nq_onnx.techniques.base`; the built-in ones are
imported (and so registered) by :mod:`nq_onnx.techniques.builtin`."""
