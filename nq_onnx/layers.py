"""The quantizable layers of a float model, found and checked (:func:`nq_onnx.passes.find_layers.find_layers`)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from nq_onnx.config import QuantConfig
from nq_onnx.errors import ModelError
from nq_onnx.passes.base import import_graph
from nq_onnx.passes.find_layers import Layers, find_layers


def discover(model: onnx.ModelProto, config: QuantConfig) -> Layers:
    """The layers ``config`` quantizes in ``model``; none at all, or a weight that is not finite, is a ModelError."""
    graph = import_graph(model)
    layers = find_layers(graph, config.exclude, config.quantize_attention_matmuls, config.attention_probabilities)
    if not layers.layers:
        if layers.excluded:
            raise ModelError("every quantizable layer is excluded; nothing left to quantize")
        raise ModelError("the model has no quantizable layer (no MatMul or Gemm with a constant weight)")
    check_finite(graph, layers)
    return layers


def check_finite(graph: gs.Graph, layers: Layers) -> None:
    """NaN or Inf in a weight or bias would poison every scale derived from it: refuse, naming the layer."""
    tensors = graph.tensors()
    for spec in layers.layers:
        for role, name in (("weight", spec.weight), ("bias", spec.bias)):
            if name is not None and not np.all(np.isfinite(tensors[name].values)):
                raise ModelError(f"layer {spec.name!r}: its {role} {name!r} contains NaN or Inf")
