"""What every graph pass shares: a result that says what was applied and what was skipped, and why; the conditions
a pass states; and :class:`Sequential`, which runs passes in order on one in-memory graph.

A pass is a small frozen dataclass (a :class:`GraphPass`) whose fields are its settings; calling it on an
``onnx_graphsurgeon.Graph`` edits that graph in place and returns a :class:`PassResult`. A pass may state what it
needs of the graph (:meth:`GraphPass.requires`) and what it leaves (:meth:`GraphPass.ensures`); :class:`Sequential`
checks both around every pass, so a pass run out of order, or one that broke its promise, stops the conversion
with the pass's name and the reason instead of writing a wrong model. Passes never run a model.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from nq_onnx.core import external_data, naming
from nq_onnx.core.errors import PassConditionError


class Role(str, enum.Enum):
    """What a pass created or changed (the values of :attr:`PassResult.created`: node or tensor names)."""

    NOISE = "noise"  # an explicit noise constant N (tensor)
    NOISE_ADD = "noise_add"  # the Add(X, N) before a group's quantizer (node)
    NOISE_FOLDED = "noise_folded"  # a preceding bias with N folded in, so no Add is needed (tensor)
    BIAS_DENOISED = "bias_denoised"  # a layer bias B' = B - N dq(W) (tensor; edited in place or a copy)
    BIAS_ADDED = "bias_added"  # a bias a layer did not have, holding -N dq(W) (tensor)
    ZERO_BIAS = "zero_bias"  # an explicit zero bias that lets onnxruntime fuse (tensor)
    INT8_WEIGHTS = "int8_weights"  # a layer whose weight codes are stored int8 (layer)
    UINT8_WEIGHTS = "uint8_weights"  # ... stored uint8 with zero point 128 (layer)
    ACT_QUANTIZER = "act_quantizer"  # a group's QuantizeLinear (node)
    TWIN_QUANTIZER = "twin_quantizer"  # a layer split into two twin-uniform branches (layer)
    INT16_CODES = "int16_codes"  # a float constant now stored as int16 codes (tensor it replaced)
    DECOMPOSED_GEMM = "decomposed_gemm"  # a Gemm rewritten as MatMul + Add (node)
    FOLDED_WEIGHT = "folded_weight"  # a weight chain folded to one constant (layer node)
    REPARAMETERIZED = "reparameterized"  # a group whose LayerNorm and layers absorbed r and c (group)
    BALANCED = "balanced"  # a group read through a Mul by 1 / r, its layers' weight rows scaled by r (group)


class SkipKind(str, enum.Enum):
    """Why a pass left something alone."""

    NOT_PLANNED = "not_planned"  # the plan has no entry for it
    EXCLUDED = "excluded"  # the user excluded it
    NO_NOISE = "no_noise"  # its plan has no (or a zero) noise vector
    NOT_NOISY = "not_noisy"  # read by an activation matmul, which takes no noise
    UNSUPPORTED = "unsupported"  # a form the pass cannot rewrite
    NOT_REPARAMETERIZED = "not_reparameterized"  # --reparam left this group as it is
    ATTENTION_KEPT = "attention_kept"  # --reparam-attention left this scores matmul as it is


@dataclasses.dataclass(frozen=True)
class Skip:
    """A layer a pass left alone, with the reason in words a user can act on."""

    layer: str
    reason: str
    kind: SkipKind = SkipKind.UNSUPPORTED

    @property
    def user_facing(self) -> bool:
        """Whether the summary lists it: a layer left in float because of the plan or the user."""
        return self.kind in (SkipKind.NOT_PLANNED, SkipKind.EXCLUDED)


@dataclasses.dataclass
class PassResult:
    """What a pass did: the layers (or groups, or nodes) it ``applied`` to, what it ``skipped`` and why, and
    what it ``created`` or changed, by :class:`Role`."""

    graph: gs.Graph
    applied: list[str] = dataclasses.field(default_factory=list)
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    created: dict[Role, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def modified(self) -> bool:
        return bool(self.applied)

    def record(self, role: Role, name: str) -> None:
        self.created.setdefault(role, []).append(name)

    def names(self, role: Role) -> list[str]:
        return list(self.created.get(role, ()))


class GraphPass:
    """A graph rewrite: ``__call__(graph) -> PassResult`` edits ``graph`` in place. ``requires`` says why a graph
    is not fit for the pass (``None``: fit); ``ensures`` says why the rewritten graph breaks the pass's promise
    (``None``: kept). Both read the graph only."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        raise NotImplementedError

    def requires(self, graph: gs.Graph) -> str | None:
        return None

    def ensures(self, graph: gs.Graph, result: PassResult) -> str | None:
        return None


@dataclasses.dataclass(frozen=True)
class Sequential:
    """Passes run in order on one graph, each one's ``requires`` checked before it and ``ensures`` after it."""

    passes: tuple[GraphPass, ...]

    def __call__(self, graph: gs.Graph) -> list[PassResult]:
        results = []
        for graph_pass in self.passes:
            _check(graph_pass, "needs", graph_pass.requires(graph))
            result = graph_pass(graph)
            _check(graph_pass, "promised", graph_pass.ensures(graph, result))
            results.append(result)
        return results


def _check(graph_pass: GraphPass, what: str, failure: str | None) -> None:
    if failure is not None:
        raise PassConditionError(f"{type(graph_pass).__name__} {what}: {failure}")


class _ExternalValues(LazyValues):
    """graphsurgeon's lazy values for a tensor in an external data file: mapped from the file when read, and
    still exported as the original reference when never read."""

    def __init__(self, tensor: onnx.TensorProto, folder: Path):
        super().__init__(tensor)
        self.folder = folder

    def load(self) -> np.ndarray:
        return external_data.array(self.tensor, self.folder)


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """``gs.import_onnx`` that can read the values of tensors kept in external data files."""
    graph = gs.import_onnx(model)
    folder = external_data.source_dir(model)
    if folder is not None:
        for tensor in graph.tensors().values():
            values = getattr(tensor, "_values", None)
            if isinstance(values, LazyValues) and external_data.is_external(values.tensor):
                tensor._values = _ExternalValues(values.tensor, folder)
    return graph


def nodes_by_name(graph: gs.Graph) -> dict[str, gs.Node]:
    return {n.name: n for n in graph.nodes}


def consumers(graph: gs.Graph, tensor: gs.Tensor) -> list[gs.Node]:
    """Nodes reading ``tensor`` (graphsurgeon keeps this list on the tensor)."""
    return list(tensor.outputs)


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(out is tensor for out in graph.outputs)


def constant(name: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(name, np.ascontiguousarray(values))


def replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[i] = new


def add_bias_after(graph: gs.Graph, node: gs.Node, layer: str, bias: gs.Constant, add_part: str) -> None:
    """A layer without a bias gets one: ``node`` (its MatMul) now writes ``{layer}/matmul_output`` and a new ``Add``
    named ``{layer}/{add_part}`` adds ``bias`` into the tensor the MatMul wrote, so every reader stays as it was."""
    out = node.outputs[0]
    inner = gs.Variable(naming.of(layer, naming.MATMUL_OUTPUT), dtype=np.float32, shape=getattr(out, "shape", None))
    node.outputs[0] = inner
    graph.nodes.append(gs.Node("Add", name=naming.of(layer, add_part), inputs=[inner, bias], outputs=[out]))


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def constant_through_identity(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of ``tensor`` if it is a constant, possibly behind ``Identity`` nodes (deduplicated initializers)."""
    seen = 0
    while not isinstance(tensor, gs.Constant):
        node = producer(tensor)
        if node is None or node.op != "Identity" or seen > 16:
            return None
        tensor, seen = node.inputs[0], seen + 1
    return tensor.values


def rewrite_model(model: onnx.ModelProto, graph_pass) -> tuple[onnx.ModelProto, "PassResult"]:
    """Run ``graph_pass`` on ``model``'s graph and export the result (cleaned up, sorted, with the model's IR version
    and metadata); the pass result says what it applied and skipped."""
    graph = import_graph(model)
    (result,) = Sequential((graph_pass,))(graph)
    graph.cleanup().toposort()
    return export_like(graph, model), result


def export_like(graph: gs.Graph, model: onnx.ModelProto) -> onnx.ModelProto:
    """``graph`` as a model with ``model``'s IR version and metadata (what a rewrite of ``model`` keeps)."""
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out
