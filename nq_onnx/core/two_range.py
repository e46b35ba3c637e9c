"""Quantizers of one activation in two uniform ranges, each with its own integer matmul: PTQ4ViT's twin-uniform
quantizers (:class:`TwinSoftmax`, :class:`TwinGelu`) and the split attention-map quantizer (:class:`SplitSoftmax`).

As in :mod:`nq_onnx.core.quantizers`, each class keeps its numpy arithmetic (``fake_quant``, ``codes``), its
float-ONNX simulation (``simulate``) and its emitted Q/DQ form (``emit_matmul``) side by side; both ranges are
:class:`~nq_onnx.core.quantizers.ActQuantizer` codes, and :func:`emit_branches` writes the two integer matmuls.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np
import onnx_graphsurgeon as gs

from nq_onnx.core import naming
from nq_onnx.core.quantizers import ActQuantizer, constant


class TwinKind(str, enum.Enum):
    """Which activation a twin-uniform quantizer is made for (PTQ4ViT)."""

    SOFTMAX = "softmax"  # attention probabilities in [0, 1]: a fine range below the split, a coarse one above
    GELU = "gelu"  # GELU outputs: a fine range for the small negative tail, a searched one for the positive side


@dataclasses.dataclass(frozen=True)
class TwinUniformQuantizer:
    """PTQ4ViT's twin-uniform quantizer (Yuan et al., ECCV 2022): two uniform ranges of ``b - 1`` bits each (one code
    bit selects the range), ``L = 2^(b-1) - 1`` the largest code of a range.

    ``SOFTMAX``, steps ``d1`` (fine) and ``d2 = 2^m d1`` (coarse), split ``t = (L + 1/2) d1``::

        T(x) = d1 clip(rint(x / d1), 0, L)     x <  t
               d2 clip(rint(x / d2), 0, L)     x >= t

    ``GELU``, steps ``d1`` for the negative side and ``d2`` for the positive one::

        T(x) = -d1 clip(rint(-x / d1), 0, L)   x < 0
                d2 clip(rint(x / d2), 0, L)    x >= 0

    Emitted as two uniform quantizers over disjoint supports, each with non-negative uint8 codes (zero point 0)
    and its own integer matmul, whose outputs add (``SOFTMAX``) or subtract (``GELU``: the negative branch is
    quantized negated)::

        T(X) @ W = dq(q_1(X [X < t])) @ W + dq(q_2(X [X >= t])) @ W
        T(X) @ W = dq(q_2(max(X, 0))) @ W - dq(q_1(max(-X, 0))) @ W

    Every code is at most ``L``, so any int8 weight is exact on U8S8 kernels without VNNI (``L * 128 * 2 < 2^15``).
    """

    bits: int
    kind: TwinKind

    @property
    def levels(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def branch(self) -> ActQuantizer:
        """The uniform quantizer of each range: ``b - 1`` bits, unsigned, codes ``[0, L]``."""
        return ActQuantizer(self.bits - 1, signed=False)

    def branches(self, x: np.ndarray, d1: float) -> tuple[np.ndarray, np.ndarray]:
        """``(fine, coarse)``: the non-negative values each range quantizes (the fine one negated for ``GELU``)."""
        x = np.asarray(x, dtype=np.float32)
        if self.kind == TwinKind.SOFTMAX:
            below = x < self.split(d1)
            return np.where(below, x, np.float32(0)), np.where(below, np.float32(0), x)
        return np.maximum(-x, np.float32(0)), np.maximum(x, np.float32(0))

    def split(self, d1: float) -> np.float32:
        return np.float32((self.levels + 0.5) * np.float32(d1))

    def codes(self, x: np.ndarray, d1: float, d2: float) -> tuple[np.ndarray, np.ndarray]:
        """The two ranges' codes (``[0, L]``, as the emitted ``QuantizeLinear`` nodes store them)."""
        fine, coarse = self.branches(x, d1)
        return self.branch.codes(fine, d1), self.branch.codes(coarse, d2)

    def fake_quant(self, x: np.ndarray, d1: float, d2: float) -> np.ndarray:
        fine, coarse = self.codes(x, d1, d2)
        sign = np.float32(1.0 if self.kind == TwinKind.SOFTMAX else -1.0)
        return (coarse.astype(np.float32) * np.float32(d2) + sign * fine.astype(np.float32) * np.float32(d1))

    def emit_matmul(self, graph: gs.Graph, node: gs.Node, index: int, d1: float, d2: float, owner: str) -> None:
        """Rewrite ``node`` (a ``MatMul`` whose input ``index`` is ``X``) as the two-branch form above: each branch
        ``[Clip] -> QuantizeLinear -> DequantizeLinear -> MatMul`` with the node's other (already dequantized)
        input, the node itself becoming the coarse branch's matmul."""
        x = node.inputs[index]
        if self.kind == TwinKind.SOFTMAX:
            zero = constant(naming.of(owner, "twin_zero"), np.array(0, np.float32))
            below = gs.Variable(naming.of(owner, "twin_below"), dtype=np.bool_)
            split = constant(naming.of(owner, "twin_split"), np.array(self.split(d1), np.float32))
            fine, coarse = (gs.Variable(naming.of(owner, f"twin_{p}_input"), dtype=np.float32)
                            for p in ("fine", "coarse"))
            graph.nodes += [gs.Node("Less", name=naming.of(owner, "twin_less"), inputs=[x, split], outputs=[below]),
                            gs.Node("Where", name=naming.of(owner, "twin_fine_where"), inputs=[below, x, zero],
                                    outputs=[fine]),
                            gs.Node("Where", name=naming.of(owner, "twin_coarse_where"), inputs=[below, zero, x],
                                    outputs=[coarse])]
        else:
            negated, fine, coarse = (gs.Variable(naming.of(owner, f"twin_{p}"), dtype=np.float32)
                                     for p in ("negated", "fine_input", "coarse_input"))
            graph.nodes += [gs.Node("Neg", name=naming.of(owner, "twin_neg"), inputs=[x], outputs=[negated]),
                            gs.Node("Relu", name=naming.of(owner, "twin_fine_relu"), inputs=[negated], outputs=[fine]),
                            gs.Node("Relu", name=naming.of(owner, "twin_coarse_relu"), inputs=[x], outputs=[coarse])]
        combine = "Add" if self.kind == TwinKind.SOFTMAX else "Sub"
        emit_branches(graph, node, index, (("fine", fine, d1), ("coarse", coarse, d2)), self.branch, combine,
                      owner, "twin")


def emit_branches(graph: gs.Graph, node: gs.Node, index: int, parts: tuple, quantizer: ActQuantizer, combine: str,
                  owner: str, label: str, bounded: tuple[str, ...] = ()) -> None:
    """Rewrite ``node`` (a ``MatMul`` whose input ``index`` is ``X``) as a sum (``combine``: ``Add``, or ``Sub`` of
    the first from the second) of two integer matmuls: each of ``parts`` (``(part, source, step)``) is quantized by
    ``quantizer`` at its step, ``[Clip] -> QuantizeLinear -> DequantizeLinear -> MatMul`` with the node's other
    (already dequantized) input; the node itself becomes the second part's matmul. The parts named in ``bounded``
    take no ``Clip``: their values never pass the codes' range (:meth:`ActQuantizer.emit`)."""
    products = []
    for position, (part, source, step) in enumerate(parts):
        quantized = quantizer.emit(graph, f"{owner}/{label}_{part}", source, step, clip=part not in bounded)
        dequantized = quantizer.emit_dequantize(graph, quantized, f"{owner}/{label}_{part}", None)
        product = gs.Variable(naming.of(owner, f"{label}_{part}_product"), dtype=np.float32)
        if position == len(parts) - 1:
            out = node.outputs[0]
            node.inputs[index], node.outputs[0] = dequantized, product
        else:
            inputs = list(node.inputs)
            inputs[index] = dequantized
            graph.nodes.append(gs.Node("MatMul", name=naming.of(owner, f"{label}_{part}_matmul"), inputs=inputs,
                                       outputs=[product]))
        products.append(product)
    graph.nodes.append(gs.Node(combine, name=naming.of(owner, f"{label}_combine"), inputs=[products[1], products[0]],
                               outputs=[out]))


@dataclasses.dataclass(frozen=True)
class TwinSoftmax:
    """The twin-uniform quantizer of attention probabilities as a quantizer of one searched step, the fine step
    ``d1``; the coarse range is fixed at ``d2 = 1 / L`` (it covers ``[0, 1]``). Its search candidates are
    ``d2 / 2^m`` (PTQ4ViT's split over powers of two), not multiples of a MinMax step."""

    low = None  # never anchored asymmetrically (the interface of ActQuantizer)
    asymmetric = False

    bits: int
    signed: bool = dataclasses.field(default=False, init=False)

    @property
    def twin(self) -> TwinUniformQuantizer:
        return TwinUniformQuantizer(self.bits, TwinKind.SOFTMAX)

    @property
    def fixed(self) -> float:
        return 1.0 / self.twin.levels

    @property
    def code_range(self) -> tuple[int, int]:
        return 0, self.twin.levels

    def minmax_scale(self, absmax: float) -> float:
        return self.fixed / 2.0

    def candidates(self, base: float, alphas: np.ndarray) -> list[float]:
        return [self.fixed / 2.0**m for m in range(1, 17)]

    def fake_quant(self, x: np.ndarray, scale: float) -> np.ndarray:
        return self.twin.fake_quant(x, scale, self.fixed)

    def simulate(self, prefix: str, x: gs.Tensor, scale: gs.Tensor) -> tuple[list[gs.Node], gs.Variable]:
        """Float ONNX of :meth:`fake_quant` with the fine step fed as ``scale``."""
        twin, branch = self.twin, self.twin.branch
        split, below, fine, coarse, out = (gs.Variable(f"{prefix}/twin_{p}", dtype=t) for p, t in (
            ("split", np.float32), ("below", np.bool_), ("fine", np.float32), ("coarse", np.float32),
            ("out", np.float32)))
        zero = gs.Constant(f"{prefix}/twin_zero", np.array(0, np.float32))
        nodes = [gs.Node("Mul", inputs=[scale, gs.Constant(f"{prefix}/twin_half", np.array(twin.levels + 0.5,
                                                                                          np.float32))],
                         outputs=[split]),
                 gs.Node("Less", inputs=[x, split], outputs=[below]),
                 gs.Node("Where", inputs=[below, x, zero], outputs=[fine]),
                 gs.Node("Where", inputs=[below, zero, x], outputs=[coarse])]
        fine_nodes, fine_q = branch.simulate(f"{prefix}/fine", fine, scale)
        coarse_nodes, coarse_q = branch.simulate(
            f"{prefix}/coarse", coarse, gs.Constant(f"{prefix}/twin_d2", np.array(self.fixed, np.float32)))
        return nodes + fine_nodes + coarse_nodes + [gs.Node("Add", inputs=[coarse_q, fine_q], outputs=[out])], out

    def emit_matmul(self, graph: gs.Graph, node: gs.Node, index: int, scale: float, owner: str) -> None:
        self.twin.emit_matmul(graph, node, index, scale, self.fixed, owner)


@dataclasses.dataclass(frozen=True)
class TwinGelu:
    """The twin-uniform quantizer of GELU outputs as a quantizer of one searched step, the positive range's ``d2``;
    the negative range has the fixed small step ``negative_step`` (``d1``, from the calibrated minimum: GELU's is
    about -0.17). Searched like a uniform step: multiples of ``max / L``."""

    low = None  # never anchored asymmetrically (the interface of ActQuantizer)
    asymmetric = False

    bits: int
    negative_step: float
    signed: bool = dataclasses.field(default=True, init=False)

    @property
    def twin(self) -> TwinUniformQuantizer:
        return TwinUniformQuantizer(self.bits, TwinKind.GELU)

    @property
    def fixed(self) -> float:
        return self.negative_step

    @property
    def code_range(self) -> tuple[int, int]:
        return -self.twin.levels, self.twin.levels

    @property
    def levels(self) -> int:
        return self.twin.levels

    @staticmethod
    def extent(low: float, high: float) -> float:
        """The positive range's MinMax step covers ``max(|low|, |high|)`` (as a symmetric quantizer's)."""
        return float(max(abs(low), abs(high)))

    def minmax_scale(self, absmax: float) -> float:
        step = float(np.float32(absmax) / np.float32(self.twin.levels))
        return step if step > 0 else 1.0

    def candidates(self, base: float, alphas: np.ndarray) -> list[float]:
        return [base * a for a in alphas]

    def fake_quant(self, x: np.ndarray, scale: float) -> np.ndarray:
        return self.twin.fake_quant(x, self.negative_step, scale)

    def simulate(self, prefix: str, x: gs.Tensor, scale: gs.Tensor) -> tuple[list[gs.Node], gs.Variable]:
        """Float ONNX of :meth:`fake_quant` with the positive step fed as ``scale``."""
        branch = self.twin.branch
        negated, fine, coarse, out = (gs.Variable(f"{prefix}/twin_{p}", dtype=np.float32)
                                      for p in ("negated", "fine", "coarse", "out"))
        nodes = [gs.Node("Neg", inputs=[x], outputs=[negated]), gs.Node("Relu", inputs=[negated], outputs=[fine]),
                 gs.Node("Relu", inputs=[x], outputs=[coarse])]
        fine_nodes, fine_q = branch.simulate(
            f"{prefix}/fine", fine, gs.Constant(f"{prefix}/twin_d1", np.array(self.negative_step, np.float32)))
        coarse_nodes, coarse_q = branch.simulate(f"{prefix}/coarse", coarse, scale)
        return nodes + fine_nodes + coarse_nodes + [gs.Node("Sub", inputs=[coarse_q, fine_q], outputs=[out])], out

    def emit_matmul(self, graph: gs.Graph, node: gs.Node, index: int, scale: float, owner: str) -> None:
        self.twin.emit_matmul(graph, node, index, self.negative_step, scale, owner)


@dataclasses.dataclass(frozen=True)
class SplitSoftmax:
    """Attention probabilities ``A`` in ``[0, 1]`` as two uniform unsigned ``b``-bit tensors that add up, with no
    float select: a fine one that saturates at the knee ``c = L d1`` and a coarse one of what lies above it,
    ``L = 2^b - 1``, the fine step ``d1`` searched, the coarse step fixed at ``d2 = 1 / L`` (``A - c < 1``)::

        S(A) = d1 clip(rint(A / d1), 0, L) + d2 clip(rint((A - c) / d2), 0, L)

        S(A) @ V = dq(q_1(A)) @ V + dq(q_2(A - c)) @ V

    Below the knee the coarse code is 0 (``A - c < 0`` clips to it) and the error is at most ``d1 / 2``; above it the
    fine code is ``L`` (exactly ``c``) and the error at most ``d2 / 2``. A uniform ``b``-bit step rounds every
    probability under half its step to 0, most of a diffuse attention row; the fine range keeps them. The coarse
    branch needs no ``Clip`` below 8 bits: its ``QuantizeLinear`` saturates ``A - c < 0`` at code 0 itself, and
    ``A - c < 1 = L d2`` never rounds past ``L``. So the form adds one ``Sub``, a second quantizer and a second
    integer matmul, where PTQ4ViT's twin (:class:`TwinSoftmax`) adds a ``Less`` and two
    ``Where`` selects and spends one bit of each range on choosing it. Both parts are uint8 codes in ``[0, L]``
    multiplied with ``V``'s uint8 codes on the kernel the uniform quantizer's product runs on, exact as that one is."""

    low = None  # never anchored asymmetrically (the interface of ActQuantizer)
    asymmetric = False

    bits: int
    signed: bool = dataclasses.field(default=False, init=False)

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    @property
    def branch(self) -> ActQuantizer:
        """The uniform quantizer of each part: ``b`` bits, unsigned, codes ``[0, L]``."""
        return ActQuantizer(self.bits, signed=False)

    @property
    def fixed(self) -> float:
        """The coarse step ``d2 = 1 / L``."""
        return float(np.float32(1.0) / np.float32(self.levels))

    @property
    def code_range(self) -> tuple[int, int]:
        return 0, self.levels

    def knee(self, d1: float) -> np.float32:
        """``c = L d1`` in float32, the value the fine part saturates at and the coarse part starts from."""
        return np.float32(self.levels) * np.float32(d1)

    def minmax_scale(self, absmax: float) -> float:
        """The uniform quantizer's MinMax step: the knee at the calibrated maximum, the coarse part empty."""
        step = float(np.float32(absmax) / np.float32(self.levels))
        return step if step > 0 else self.fixed

    def candidates(self, base: float, alphas: np.ndarray) -> list[float]:
        """Fine steps: the uniform quantizer's candidates (multiples of its MinMax step ``base``, whose knee clips
        where it would) and ``d2 / 2^(m/2)``, ``m = 2..24`` (knees from ``1/2`` down to ``1/4096``)."""
        return [base * a for a in alphas] + [self.fixed / 2.0 ** (m / 2) for m in range(2, 25)]

    def codes(self, x: np.ndarray, d1: float) -> tuple[np.ndarray, np.ndarray]:
        """The two parts' codes (``[0, L]``, as the emitted ``QuantizeLinear`` nodes store them)."""
        x = np.asarray(x, dtype=np.float32)
        coarse = np.subtract(x, self.knee(d1), dtype=np.float32)
        return self.branch.codes(x, d1), self.branch.codes(coarse, self.fixed)

    def fake_quant(self, x: np.ndarray, scale: float) -> np.ndarray:
        fine, coarse = self.codes(x, scale)
        return fine.astype(np.float32) * np.float32(scale) + coarse.astype(np.float32) * np.float32(self.fixed)

    def simulate(self, prefix: str, x: gs.Tensor, scale: gs.Tensor) -> tuple[list[gs.Node], gs.Variable]:
        """Float ONNX of :meth:`fake_quant` with the fine step fed as ``scale``."""
        knee, coarse, out = (gs.Variable(f"{prefix}/split_{p}", dtype=np.float32) for p in ("knee", "coarse", "out"))
        levels = gs.Constant(f"{prefix}/split_levels", np.array(self.levels, np.float32))
        nodes = [gs.Node("Mul", inputs=[levels, scale], outputs=[knee]),
                 gs.Node("Sub", inputs=[x, knee], outputs=[coarse])]
        fine_nodes, fine_q = self.branch.simulate(f"{prefix}/fine", x, scale)
        coarse_nodes, coarse_q = self.branch.simulate(
            f"{prefix}/coarse", coarse, gs.Constant(f"{prefix}/split_d2", np.array(self.fixed, np.float32)))
        return nodes + fine_nodes + coarse_nodes + [gs.Node("Add", inputs=[fine_q, coarse_q], outputs=[out])], out

    def emit_matmul(self, graph: gs.Graph, node: gs.Node, index: int, scale: float, owner: str) -> None:
        """``node`` as the two integer matmuls above (:func:`emit_branches`)."""
        x = node.inputs[index]
        coarse = gs.Variable(naming.of(owner, "split_coarse_input"), dtype=np.float32)
        knee = constant(naming.of(owner, "split_knee"), np.array(self.knee(scale), np.float32))
        graph.nodes.append(gs.Node("Sub", name=naming.of(owner, "split_sub"), inputs=[x, knee], outputs=[coarse]))
        emit_branches(graph, node, index, (("fine", x, scale), ("coarse", coarse, self.fixed)), self.branch, "Add",
                      owner, "split", bounded=("coarse",))
