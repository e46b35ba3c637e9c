"""LayerNorm scale reparameterization (RepQ-ViT, Li et al. 2023): equal channel ranges for a per-tensor quantizer.

A post-LayerNorm activation ``X`` has channels of very different ranges, which one per-tensor step serves badly.
With per-channel factors ``r > 0`` and shifts ``c`` (a group's :class:`~nq_onnx.core.plan.Reparam`), the float model is
rewritten so that its layers read ``X' = (X - c) / r`` and compute the same outputs::

    X = LN(z) = z_hat * gamma + beta       ->    X' = z_hat * (gamma / r) + (beta - c) / r
    Y = X W + B                            ->    Y  = X' (diag(r) W) + (B + c W)

in the ``X @ W`` layout (``W`` is ``[K, N]``, ``r`` and ``c`` run over ``K``). ``X`` may be produced by a
``LayerNormalization`` node or by any per-channel affine ``Add(Mul(z, gamma), beta)`` (a decomposed LayerNorm of an
opset < 17 export), also through ops that only move tokens (:mod:`nq_onnx.passes.channels`). It is refused, with
the reason, where anything besides the group's layers reads ``X``, or the affine is not over the channel axis. Every
changed constant is a new one (a shared initializer is never edited), a layer without a bias gets one where ``c``
is not zero. The rewrite is exact in real arithmetic; in float32 it moves outputs by rounding only.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from nq_onnx.core import naming
from nq_onnx.passes.base import GraphPass, PassResult, Role, Skip, SkipKind, add_bias_after, constant
from nq_onnx.passes.base import constant_through_identity, nodes_by_name
from nq_onnx.passes.channels import channel_source
from nq_onnx.passes.find_layers import Layers, layers_kept, require_matmul
from nq_onnx.core.plan import Reparam


Slot = tuple[gs.Node, int]  # an input of a node


@dataclasses.dataclass(frozen=True)
class ReparamLayerNorm(GraphPass):
    """``factors``: the reparameterization of each group to rewrite, by group name. Layer specs found before the
    pass name the old weights and biases: find the layers again on the rewritten graph."""

    layers: Layers
    factors: dict[str, Reparam]

    def __call__(self, graph: gs.Graph) -> PassResult:
        result = PassResult(graph)
        tensors = graph.tensors()
        nodes = nodes_by_name(graph)
        for group in self.layers.groups:
            reparam = self.factors.get(group.name)
            if reparam is None:
                continue
            readers = {self.layers.layer(name).node for name in group.consumers}
            slots, reason = affine_slots(graph, tensors[group.tensor], readers, group.channels)
            if slots is None:
                result.skipped.append(Skip(group.name, reason, SkipKind.NOT_REPARAMETERIZED))
                continue
            r, c = reparam.scale.astype(np.float64), reparam.shift.astype(np.float64)
            gamma, beta = (_vector(slot, group.channels) for slot in slots)
            _set(slots[0], constant(naming.of(group.name, naming.REPARAM_GAMMA), (gamma / r).astype(np.float32)))
            _set(slots[1], constant(naming.of(group.name, naming.REPARAM_BETA), ((beta - c) / r).astype(np.float32)))
            for name in group.consumers:
                fold_into_layer(graph, nodes, self.layers.layer(name), r, c)
            result.applied.append(group.name)
            result.record(Role.REPARAMETERIZED, group.name)
        return result

    def ensures(self, graph: gs.Graph, result: PassResult) -> str | None:
        """Every layer the pass was given is still there, of the same kind: the layers found again match."""
        return layers_kept(graph, self.layers)


def affine_slots(graph: gs.Graph, x: gs.Tensor, readers: set[str],
                 channels: int) -> tuple[tuple[Slot, Slot] | None, str]:
    """The ``(gamma, beta)`` inputs of the per-channel affine producing ``x`` and ``""``, or ``None`` and why not."""
    node = channel_source(graph, x, readers)
    if node is None:
        return None, "the LayerNorm output is read by more than the group's layers"
    if node.op == "LayerNormalization":
        rank = len(getattr(node.inputs[0], "shape", None) or ())
        if int(node.attrs.get("axis", -1)) not in (-1, rank - 1):
            return None, "the LayerNorm normalizes over more than the channel axis"
        if not _channel_vector(node.inputs[1], channels) or (
                len(node.inputs) > 2 and not _channel_vector(node.inputs[2], channels)):
            return None, "the LayerNorm's scale or bias is not a constant over the channels"
        return ((node, 1), (node, 2)), ""
    if node.op == "Add" and len(node.inputs) == 2:
        beta = next((i for i, t in enumerate(node.inputs) if _channel_vector(t, channels)), None)
        scaled = node.inputs[1 - beta] if beta is not None else None
        mul = scaled.inputs[0] if scaled is not None and scaled.inputs and len(scaled.outputs) == 1 else None
        gamma = next((i for i, t in enumerate(mul.inputs) if _channel_vector(t, channels)), None) \
            if mul is not None and mul.op == "Mul" else None
        if gamma is not None:
            return ((mul, gamma), (node, beta)), ""
    return None, f"its input is produced by {node.op}, not a LayerNorm (or a per-channel affine)"


def _channel_vector(tensor: gs.Tensor, channels: int) -> bool:
    values = constant_through_identity(tensor)
    return values is not None and values.dtype == np.float32 and values.size == channels \
        and values.shape[-1] == channels


def _vector(slot: Slot, channels: int) -> np.ndarray:
    """The constant at ``slot`` as a float64 vector (a LayerNorm without a bias input: zeros)."""
    node, index = slot
    if index >= len(node.inputs):
        return np.zeros(channels)
    return constant_through_identity(node.inputs[index]).astype(np.float64).reshape(-1)


def _set(slot: Slot, tensor: gs.Tensor) -> None:
    node, index = slot
    if index < len(node.inputs):
        node.inputs[index] = tensor
    else:
        node.inputs.append(tensor)


def fold_into_layer(graph: gs.Graph, nodes: dict, spec, r: np.ndarray, c: np.ndarray) -> None:
    """``W' = diag(r) W`` and ``B' = B + c W`` as new constants (a missing bias is added where ``c W != 0``)."""
    node = require_matmul(nodes[spec.node])
    w = constant_through_identity(node.inputs[1]).astype(np.float64)
    node.inputs[1] = constant(naming.of(spec.name, naming.REPARAM_WEIGHT), (r[:, None] * w).astype(np.float32))
    delta = c @ w
    if spec.bias is not None:
        owner = nodes[spec.bias_node]
        slot = next(i for i, t in enumerate(owner.inputs) if t.name == spec.bias)
        bias = constant_through_identity(owner.inputs[slot]).astype(np.float64)
        owner.inputs[slot] = constant(naming.of(spec.name, naming.REPARAM_BIAS), (bias + delta).astype(np.float32))
    elif np.any(delta):
        add_bias_after(graph, node, spec.name, constant(naming.of(spec.name, naming.REPARAM_BIAS),
                                                        delta.astype(np.float32)), naming.ADD_REPARAM_BIAS)
