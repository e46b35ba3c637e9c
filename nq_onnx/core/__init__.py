"""The bottom layer: the values every other part of nq-onnx reads and none of them owns: the configuration and its
options, the plan, each quantizer's arithmetic, the technique interface, names, errors and file writing. Nothing here
imports from the rest of the project, so the graph passes (``passes/``), the onnxruntime side (``calibration/``) and
everything above them may depend on it."""
