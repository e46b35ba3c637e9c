"""The search machinery: the sequential planner (:mod:`~nq_onnx.search.planner`), EasyQuant's and NoisyQuant's
per-group searches (:mod:`~nq_onnx.search.groups`), the activation-matmul search (:mod:`~nq_onnx.search.matmul`),
their grids and objectives, and the maths the finishing and width-choosing techniques use (GPTQ and bias correction,
:mod:`~nq_onnx.search.rounding`; mixed precision's knapsack, :mod:`~nq_onnx.search.mixed`). It imports the bottom
layer, the graph passes and the onnxruntime side; the techniques build on it."""
