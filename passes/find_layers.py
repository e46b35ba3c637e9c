"""Find the matrix multiplications to quantize and the activation tensors that feed them.

A *linear* layer is ``MatMul(X, W)`` with a constant 2-D ``W`` of shape ``[K, N]`` (the exporters store ``W^T`` of
a ``Linear``); its output channels lie along axis 1. Its bias is the constant 1-D operand of the single ``Add``
that consumes the ``MatMul`` output. The graph must be in the canonical form of ``pipeline.canonicalize`` (every
weight ``Gemm`` rewritten as ``MatMul + Add``): a weight ``Gemm`` is refused. An *activation matmul* is a
``MatMul`` whose two operands are both computed (attention ``Q K^T`` and ``A V``).

An *activation group* is one tensor ``X`` and every quantized layer reading it: they share one activation
scale and one noise vector ``N`` (so ``X + N`` is quantized once), while each layer gets its own weight codes
and its own denoised bias. This pass only reads the graph.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from nq_onnx.core import naming
from nq_onnx.core.errors import ConfigError, ModelError
from nq_onnx.passes.base import import_graph

if TYPE_CHECKING:
    from nq_onnx.core.config import QuantConfig

LINEAR = "linear"
ACT_MATMUL = "act_matmul"


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One quantizable matrix multiplication, identified by its node name."""

    name: str
    node: str
    op: str
    kind: str
    inputs: tuple[str, ...]
    weight: str | None = None
    bias: str | None = None
    bias_node: str | None = None
    in_features: int = 0
    out_features: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """An activation tensor and the quantized layers that read it."""

    name: str
    tensor: str
    consumers: tuple[str, ...]
    channels: int
    noisy: bool
    after: str = ""  # what produces the tensor: "softmax", "gelu" (also decomposed with Erf or Tanh) or ""


@dataclasses.dataclass(frozen=True)
class Layers:
    layers: tuple[LayerSpec, ...]
    groups: tuple[GroupSpec, ...]
    excluded: tuple[tuple[str, str], ...] = ()
    read_tokens: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (token count, positions read): :func:`read_tokens`

    def read_rows(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The token positions the model's output reads in a ``[B, T, C]`` value of this shape (none for another
        rank, or a token count no read was found for: the patches before the class token is prepended)."""
        if len(shape) != 3:
            return ()
        return dict(self.read_tokens).get(int(shape[1]), ())

    def layer(self, name: str) -> LayerSpec:
        return next(layer for layer in self.layers if layer.name == name)

    def group(self, name: str) -> GroupSpec:
        return next(group for group in self.groups if group.name == name)

    def group_of(self, tensor: str) -> GroupSpec:
        return next(group for group in self.groups if group.tensor == tensor)


def const_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (initializer or ``Constant`` node), else ``None``."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    node = tensor.inputs[0] if tensor.inputs else None
    if node is not None and node.op == "Constant" and "value" in node.attrs:
        value = node.attrs["value"]
        return value.values if isinstance(value, gs.Constant) else np.asarray(value)
    return None


def readable_name(node: gs.Node) -> str:
    """Module path of an exported node: ``/blocks/blocks.3/mlp/fc1/MatMul`` -> ``blocks.3.mlp.fc1``."""
    raw = node.name or (node.outputs[0].name if node.outputs else node.op)
    if not raw.startswith("/"):
        return raw
    parts = [p for p in raw.strip("/").split("/") if p]
    module = parts[:-1]
    kept = [p for i, p in enumerate(module) if not (i + 1 < len(module) and module[i + 1].startswith(p + "."))]
    return ".".join(kept) if kept else parts[-1]


def _bias_of_matmul(node: gs.Node, out_features: int) -> tuple[str | None, str | None]:
    out = node.outputs[0]
    if len(out.outputs) != 1 or out.outputs[0].op != "Add":
        return None, None
    add = out.outputs[0]
    other = [t for t in add.inputs if t is not out]
    if len(other) != 1 or not isinstance(other[0], gs.Constant):
        return None, None
    values = other[0].values
    if values.ndim != 1 or values.shape[0] != out_features or values.dtype != np.float32:
        return None, None
    return other[0].name, add.name


def _linear(node: gs.Node) -> LayerSpec | None:
    if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    x, w = node.inputs[0], node.inputs[1]
    if const_value(x) is not None or not isinstance(w, gs.Constant) or w.values.ndim != 2:
        return None
    if w.values.dtype != np.float32:
        return None
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return None
        raise ValueError(f"weight Gemm {node.name!r} in the graph: the passes need pipeline.canonicalize first")
    in_features, out_features = (int(d) for d in w.values.shape)
    bias_name, bias_node = _bias_of_matmul(node, out_features)
    return LayerSpec(
        name="",
        node=node.name,
        op=node.op,
        kind=LINEAR,
        inputs=(x.name,),
        weight=w.name,
        bias=bias_name,
        bias_node=bias_node,
        in_features=in_features,
        out_features=out_features,
    )


def require_matmul(node: gs.Node) -> gs.Node:
    """``node``, checked to be a ``MatMul`` (the canonical form every pass after ``find_layers`` relies on)."""
    if node.op != "MatMul":
        raise ValueError(f"layer node {node.name!r} is a {node.op}, not a MatMul: canonicalize the graph first")
    return node


def _act_matmul(node: gs.Node) -> LayerSpec | None:
    if node.op != "MatMul" or any(const_value(t) is not None for t in node.inputs[:2]):
        return None
    return LayerSpec(
        name="", node=node.name, op="MatMul", kind=ACT_MATMUL, inputs=(node.inputs[0].name, node.inputs[1].name)
    )


def _unique_names(graph: gs.Graph, specs: list[tuple[gs.Node, LayerSpec]]) -> list[LayerSpec]:
    base = [readable_name(node) for node, _ in specs]
    counts: dict[str, int] = {}
    for name in base:
        counts[name] = counts.get(name, 0) + 1
    out = []
    for (node, spec), name in zip(specs, base):
        if spec.kind == ACT_MATMUL or counts[name] > 1:
            op_name = node.name.rstrip("/").split("/")[-1] if node.name else node.op
            name = f"{name}.{op_name}" if name != op_name else name
        out.append(dataclasses.replace(spec, name=name))
    seen: set[str] = set()
    for spec in out:
        if spec.name in seen:
            raise ConfigError(f"two layers resolve to the same name {spec.name!r}; name the graph's nodes uniquely")
        seen.add(spec.name)
    return out


def find_layers(graph: gs.Graph, exclude: tuple[str, ...] = (), act_matmuls: bool = True,
                probabilities: bool = True) -> Layers:
    """Every quantizable layer in topological order, grouped by the activation tensor they read.

    ``exclude`` patterns (fnmatch on layer names) drop layers; a pattern that matches nothing raises
    :class:`ConfigError`. ``act_matmuls = False`` leaves every activation matmul in float; ``probabilities = False``
    those that read a ``Softmax`` output (an attention map's ``A V``) only.
    """
    graph.toposort()
    found: list[tuple[gs.Node, LayerSpec]] = []
    tensors = graph.tensors()
    for node in graph.nodes:
        spec = _linear(node) or (_act_matmul(node) if act_matmuls else None)
        if spec is not None and spec.kind == ACT_MATMUL and not probabilities and any(
                _activation(tensors.get(t)) == "softmax" for t in spec.inputs):
            continue
        if spec is not None:
            found.append((node, spec))
    specs = _unique_names(graph, found)
    excluded: list[tuple[str, str]] = []
    kept: list[LayerSpec] = []
    used = set()
    for spec in specs:
        hit = next((p for p in exclude if fnmatch.fnmatchcase(spec.name, p)), None)
        if hit is not None:
            used.add(hit)
            excluded.append((spec.name, f"excluded by pattern {hit!r}"))
        else:
            kept.append(spec)
    unused = [p for p in exclude if p not in used]
    if unused:
        raise ConfigError(
            f"exclude pattern {unused[0]!r} matches no layer (layers look like {specs[0].name!r})"
            if specs
            else f"exclude pattern {unused[0]!r} matches no layer"
        )
    return Layers(tuple(kept), _groups(graph, kept), tuple(excluded), tuple(sorted(read_tokens(graph).items())))


def _channels(graph: gs.Graph, tensor_name: str, consumers: list[LayerSpec]) -> int:
    for spec in consumers:
        if spec.kind == LINEAR:
            return spec.in_features
    tensor = graph.tensors().get(tensor_name)
    shape = getattr(tensor, "shape", None)
    if shape and isinstance(shape[-1], int):
        return int(shape[-1])
    return 0


def _groups(graph: gs.Graph, layers: list[LayerSpec]) -> tuple[GroupSpec, ...]:
    by_tensor: dict[str, list[LayerSpec]] = {}
    for spec in layers:
        for tensor in spec.inputs:
            by_tensor.setdefault(tensor, []).append(spec)
    groups = []
    used_names: set[str] = set()
    for tensor, consumers in by_tensor.items():
        first = consumers[0]
        if first.kind == ACT_MATMUL:
            name = f"{first.name}/input{first.inputs.index(tensor)}"
        else:
            name = first.name
        name = _dedupe(re.sub(r"\s+", "_", name), used_names)
        noisy = all(c.kind == LINEAR for c in consumers)
        groups.append(GroupSpec(name, tensor, tuple(c.name for c in consumers), _channels(graph, tensor, consumers),
                                noisy, _activation(graph.tensors().get(tensor))))
    return tuple(groups)


def read_tokens(graph: gs.Graph) -> dict[int, tuple[int, ...]]:
    """The token positions the model's output reads: per token count ``T``, the constant indices of every ``Gather``
    on axis 1 of a ``[B, T, C]`` tensor (a ViT's class-token head, ``x[:, 0]``; DeiT's distillation token too).
    A model that pools every token (Swin's mean) has none. Tensors without static shapes are not matched."""
    read: dict[int, set[int]] = {}
    for node in graph.nodes:
        if node.op != "Gather" or len(node.inputs) != 2:
            continue
        shape = getattr(node.inputs[0], "shape", None)
        if shape is None or len(shape) != 3 or not isinstance(shape[1], int):
            continue
        axis = int(node.attrs.get("axis", 0))
        index = const_value(node.inputs[1])
        if axis not in (1, -2) or index is None or index.ndim > 1 or index.dtype.kind not in "iu":
            continue
        tokens = int(shape[1])
        read.setdefault(tokens, set()).update(int(i) % tokens for i in np.atleast_1d(index))
    return {tokens: tuple(sorted(rows)) for tokens, rows in read.items()}


def _activation(tensor: gs.Tensor | None) -> str:
    """``"softmax"`` for a ``Softmax`` output, ``"gelu"`` for a ``Gelu`` output or the last node of a decomposed GELU
    (``x * 0.5 * (1 + erf(x / sqrt 2))``, or its tanh form: an ``Erf``/``Tanh`` within four nodes above), else
    ``""``; a channel-balanced input (:mod:`nq_onnx.passes.balance_channels`) is what its ``Mul`` reads."""
    node = tensor.inputs[0] if tensor is not None and tensor.inputs else None
    if node is None:
        return ""
    if node.op == "Mul" and node.name.endswith("/" + naming.BALANCE_MUL):  # a balanced input is what it balances
        return _activation(node.inputs[0])
    if node.op == "Softmax":
        return "softmax"
    if node.op == "Gelu":
        return "gelu"
    if node.op != "Mul":
        return ""
    frontier, seen = [node], 0
    while frontier and seen < 4:
        frontier = [t.inputs[0] for n in frontier for t in n.inputs if t.inputs]
        if any(n.op in ("Erf", "Tanh") for n in frontier):
            return "gelu"
        seen += 1
    return ""


def layers_kept(graph: gs.Graph, layers: Layers) -> str | None:
    """Why ``graph`` no longer holds ``layers``, or ``None``: the condition a rewrite of the float model keeps, so
    that the layers found on its result are the ones it was given: each layer's node is still a ``MatMul``, and a
    linear layer's weight still a constant. Reads the graph only, and no weight's values (a weight in an external
    data file stays unread)."""
    nodes = {node.name: node for node in graph.nodes}
    for spec in layers.layers:
        node = nodes.get(spec.node)
        if node is None or node.op != "MatMul":
            return f"layer {spec.name!r}: its MatMul {spec.node!r} is gone"
        weight = node.inputs[1]
        if spec.kind == LINEAR and not (isinstance(weight, gs.Constant) or _produced_by(weight, "Constant")):
            return f"layer {spec.name!r}: its weight is no longer a constant"
    return None


def _produced_by(tensor: gs.Tensor, op: str) -> bool:
    return bool(tensor.inputs) and tensor.inputs[0].op == op

def _dedupe(name: str, used: set[str]) -> str:
    candidate, i = name, 1
    while candidate in used:
        candidate = f"{name}_{i}"
        i += 1
    used.add(candidate)
    return candidate


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
