"""The quantizers: each one's numpy arithmetic, its float-ONNX simulation and its emitted Q/DQ side by side.

The search scores candidates with :meth:`fake_quant` (numpy), the sequential simulation runs
:meth:`ActQuantizer.simulate` (float ONNX ops, one onnxruntime session for the whole search) and the
``insert_qdq`` pass writes :meth:`ActQuantizer.emit` / :meth:`WeightQuantizer.emit`. Keeping the three in one
class is what stops them drifting apart; ``tests/test_simulation.py`` checks the emitted graph against the
simulation layer by layer, ``tests/test_passes.py`` the emitted codes against :mod:`nq_onnx.core.quant` bit for bit.
The quantizers of one activation in two ranges (twin-uniform, split) are in :mod:`nq_onnx.core.two_range`.

Activations, per tensor, step ``s`` (codes ``[lo, hi]``: ``[-2^(b-1), 2^(b-1) - 1]``, or ``[0, 2^b - 1]``
unsigned; stored as uint8 with zero point ``zp`` = 128, or 0 unsigned)::

    numpy       dq(q(x)) = s * clip(rint(x / s), lo, hi)
    simulation  Mul(Round(Clip(Div(x, s), lo, hi)), s)
    emitted     [Clip(x, lo s, hi s)] -> QuantizeLinear(s, zp, uint8) -> DequantizeLinear(s, zp)

(``Round`` and ``QuantizeLinear`` both round half to even; the explicit ``Clip`` only below 8 bits, where the
uint8 container alone would not keep codes inside the b-bit range.)

Weights, per output channel ``c`` of a ``[K, N]`` weight (the canonical ``X @ W`` layout), steps ``s_c``::

    numpy       dq(q(W))[:, c] = s_c * clip(rint(W[:, c] / s_c), -2^(b-1), 2^(b-1) - 1)
    emitted     DequantizeLinear(codes, s, zero point 0 (int8) or 128 (uint8, codes + 128), axis 1)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from nq_onnx.core import naming, quant
from nq_onnx.core.quantized_layer import QuantizedLayer


def constant(name: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(name, np.ascontiguousarray(values))


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """The emitted codes of one activation and the scale / zero-point constants its dequantizers share."""

    codes: gs.Variable
    scale: gs.Constant
    zero_point: gs.Constant


@dataclasses.dataclass(frozen=True)
class ActQuantizer:
    """Per-tensor uniform quantizer of an activation: symmetric (scale only), unsigned, or asymmetric.

    Symmetric codes are ``[-2^(b-1), 2^(b-1) - 1]`` (stored as uint8 with zero point 128, or as int8 with zero point
    0 where ``int8``: the form TensorRT fuses), unsigned ones ``[0, 2^b - 1]`` (zero point 0). An asymmetric quantizer
    is anchored at the tensor's calibrated minimum ``low < 0``: its zero point follows its step,
    ``z(s) = min(2^b - 1, rint(-low / s))`` (:func:`nq_onnx.core.quant.asymmetric_zero_point`), and ::

        dq(q(x)) = s * clip(rint(x / s), -z(s), 2^b - 1 - z(s))       stored  u = q + z(s) in [0, 2^b - 1]

    so the codes cover ``[low, (2^b - 1 - z) s]``: a one-sided tensor (a GELU output, ``>= -0.17``) spends every
    code on values it takes, where a symmetric range leaves nearly half of them on a side it never reaches. A step
    below the MinMax one ``(max - low) / (2^b - 1)`` clips the top only. onnxruntime's integer kernels take any
    activation zero point at no cost. NoisyQuant's ``X + N`` is quantized by the same formula: the denoising bias
    ``B - N dq(W)`` does not depend on the quantizer, and ``z`` is fixed by ``low`` and the step alone.
    """

    bits: int
    signed: bool = True
    low: float | None = None  # asymmetric: the calibrated minimum the codes are anchored at (< 0)
    int8: bool = False  # a symmetric quantizer stored as int8 with zero point 0 instead of uint8 with 128

    def __post_init__(self) -> None:
        if self.low is not None and not self.low < 0:
            raise ValueError("an asymmetric quantizer is anchored at a negative minimum")
        if self.int8 and (self.low is not None or not self.signed):
            raise ValueError("int8 storage holds symmetric signed codes only")

    @property
    def asymmetric(self) -> bool:
        return self.low is not None

    @property
    def levels(self) -> int:
        """The largest code of the MinMax range: ``2^(b-1) - 1`` symmetric, ``2^b - 1`` unsigned or asymmetric."""
        return quant.qmax(self.bits) if self.signed and not self.asymmetric else 2**self.bits - 1

    @property
    def code_range(self) -> tuple[int, int]:
        """The code range of a symmetric or unsigned quantizer (an asymmetric one's depends on the step:
        :meth:`codes_for`)."""
        if self.asymmetric:
            raise ValueError("an asymmetric quantizer's code range depends on its step: use codes_for(scale)")
        return quant.code_range(self.bits, self.signed)

    def codes_for(self, scale: float) -> tuple[int, int]:
        """The code range ``[lo, hi]`` at step ``scale``."""
        if not self.asymmetric:
            return self.code_range
        z = quant.asymmetric_zero_point(self.low, scale, self.bits)
        return -z, 2**self.bits - 1 - z

    def zero_point_for(self, scale: float) -> int:
        """The stored zero point at step ``scale``."""
        if self.asymmetric:
            return quant.asymmetric_zero_point(self.low, scale, self.bits)
        return 0 if self.int8 else quant.zero_point(self.signed)

    @property
    def stored_range(self) -> tuple[int, int]:
        """The uint8 values the emitted ``QuantizeLinear`` can produce."""
        if self.asymmetric:
            return 0, 2**self.bits - 1
        return quant.stored_code_range(self.bits, self.signed)

    def extent(self, low: float, high: float) -> float:
        """The width of values a MinMax step must cover for a tensor in ``[low, high]``: ``max(|low|, |high|)``
        symmetric, ``high - min(low, self.low)`` asymmetric (the step is ``extent / levels``)."""
        if self.asymmetric:
            return float(high - min(low, self.low))
        return float(max(abs(low), abs(high)))

    def minmax_scale(self, absmax: float) -> float:
        if self.asymmetric:  # a positively skewed tensor: its absmax is its maximum
            step = np.float32(absmax - self.low) / np.float32(self.levels)
            return float(step) if step > 0 else 1.0
        return float(quant.minmax_scale(absmax, self.bits, self.signed))

    def fake_quant(self, x: np.ndarray, scale: float) -> np.ndarray:
        if self.asymmetric:
            return quant.fake_quant_codes(x, scale, *self.codes_for(scale))
        return quant.fake_quant(x, np.float32(scale), self.bits, self.signed)

    def candidates(self, base: float, alphas: np.ndarray) -> list[float]:
        """The steps a search tries: multiples of the MinMax step."""
        return [base * a for a in alphas]

    def codes(self, x: np.ndarray, scale: float) -> np.ndarray:
        if self.asymmetric:
            return quant.rounded_codes(x, scale, *self.codes_for(scale)).astype(np.int32)
        return quant.quantize(x, np.float32(scale), self.bits, self.signed)

    def simulate(self, prefix: str, x: gs.Tensor, scale: gs.Tensor) -> tuple[list[gs.Node], gs.Variable]:
        """Float ONNX nodes computing :meth:`fake_quant` of ``x`` with a fed ``scale`` (the search's simulation);
        an asymmetric quantizer computes its code range from the fed step as :meth:`codes_for` does."""
        t = [gs.Variable(f"{prefix}/t{i}", dtype=np.float32) for i in range(1, 5)]
        bounds, nodes = self._simulated_bounds(prefix, scale)
        nodes += [
            gs.Node("Div", inputs=[x, scale], outputs=[t[0]]),
            gs.Node("Clip", inputs=[t[0], *bounds], outputs=[t[1]]),
            gs.Node("Round", inputs=[t[1]], outputs=[t[2]]),
            gs.Node("Mul", inputs=[t[2], scale], outputs=[t[3]]),
        ]
        return nodes, t[3]

    def _simulated_bounds(self, prefix: str, scale: gs.Tensor) -> tuple[list[gs.Tensor], list[gs.Node]]:
        """The ``Clip`` bounds ``[lo, hi]`` as constants, or for an asymmetric quantizer as nodes computing
        ``-z`` and ``2^b - 1 - z`` with ``z = Min(Round(Div(-low, s)), 2^b - 1)``."""
        if not self.asymmetric:
            lo, hi = self.code_range
            return [gs.Constant(f"{prefix}/lo", np.array(lo, np.float32)),
                    gs.Constant(f"{prefix}/hi", np.array(hi, np.float32))], []
        top = gs.Constant(f"{prefix}/top", np.array(2**self.bits - 1, np.float32))
        z = [gs.Variable(f"{prefix}/z{i}", dtype=np.float32) for i in range(1, 6)]
        nodes = [gs.Node("Div", inputs=[gs.Constant(f"{prefix}/neg_low", np.array(-self.low, np.float32)), scale],
                         outputs=[z[0]]),
                 gs.Node("Round", inputs=[z[0]], outputs=[z[1]]),
                 gs.Node("Min", inputs=[z[1], top], outputs=[z[2]]),
                 gs.Node("Neg", inputs=[z[2]], outputs=[z[3]]),
                 gs.Node("Sub", inputs=[top, z[2]], outputs=[z[4]])]
        return [z[3], z[4]], nodes

    def emit(self, graph: gs.Graph, group: str, source: gs.Tensor, scale: float, clip: bool = True) -> QuantizedTensor:
        """Append ``[Clip] -> QuantizeLinear`` of ``source`` to ``graph``; dequantize with :meth:`emit_dequantize`.
        Below 8 bits a ``Clip`` keeps the codes in the width's range, unless ``clip`` is false: the caller's guarantee
        that no value of ``source`` rounds above the top code and that ``QuantizeLinear`` itself saturates any value
        below the bottom one there (unsigned codes, zero point 0)."""
        scale32 = np.float32(scale)
        shape = getattr(source, "shape", None)
        lo, hi = self.codes_for(scale32)
        if self.bits < 8 and clip:
            clipped = gs.Variable(naming.of(group, naming.INPUT_CLIPPED), dtype=np.float32, shape=shape)
            bounds = [constant(naming.of(group, part), np.array(v * scale32, np.float32))
                      for part, v in ((naming.INPUT_CLIP_MIN, lo), (naming.INPUT_CLIP_MAX, hi))]
            graph.nodes.append(gs.Node("Clip", name=naming.of(group, naming.INPUT_CLIP),
                                       inputs=[source, *bounds], outputs=[clipped]))
            source = clipped
        dtype = np.int8 if self.int8 else np.uint8
        codes = gs.Variable(naming.of(group, naming.INPUT_QUANTIZED), dtype=dtype, shape=shape)
        out = QuantizedTensor(codes, constant(naming.of(group, naming.INPUT_SCALE), np.array(scale32, np.float32)),
                              constant(naming.of(group, naming.INPUT_ZERO_POINT),
                                        np.array(self.zero_point_for(scale32), dtype)))
        graph.nodes.append(gs.Node("QuantizeLinear", name=naming.of(group, naming.INPUT_QUANTIZE),
                                   inputs=[source, out.scale, out.zero_point], outputs=[codes]))
        return out

    @staticmethod
    def emit_dequantize(graph: gs.Graph, quantized: QuantizedTensor, layer: str, index: int | None) -> gs.Variable:
        """A ``DequantizeLinear`` of ``quantized`` for one consumer (``index``: which input of an activation
        matmul; ``None`` for a linear layer's single input)."""
        node_name = naming.input_dequantize(layer, index)
        out = gs.Variable(naming.dequantized(node_name), dtype=np.float32, shape=quantized.codes.shape)
        graph.nodes.append(gs.Node("DequantizeLinear", name=node_name,
                                   inputs=[quantized.codes, quantized.scale, quantized.zero_point], outputs=[out]))
        return out


@dataclasses.dataclass(frozen=True)
class WeightQuantizer:
    """Symmetric per-output-channel uniform quantizer of a ``[K, N]`` weight (channels along axis 1).

    With ``pair_limit`` (``int8-paired`` storage) its codes also keep ``|q_2i| + |q_2i+1| <= pair_limit`` on the
    pairs of rows that onnxruntime's U8S8 kernel adds into one int16 (:func:`nq_onnx.core.quant.limit_pairs`); the
    MinMax step is then the one at which no pair passes it (:func:`nq_onnx.core.quant.pair_scales`). A width whose
    codes cannot pass it (``2^b <= pair_limit``: 7 bits or fewer at 128) is unaffected."""

    bits: int
    pair_limit: int | None = None

    @property
    def code_range(self) -> tuple[int, int]:
        return quant.code_range(self.bits)

    @property
    def paired(self) -> bool:
        """Whether the pair limit can bind at this width."""
        return self.pair_limit is not None and 2**self.bits > self.pair_limit  # the largest pair: two -2^(b-1)

    def minmax_scales(self, w_kn: np.ndarray) -> np.ndarray:
        if self.paired:
            return quant.pair_scales(w_kn, self.bits, self.pair_limit)
        return quant.weight_scales(w_kn, axis=1, bits=self.bits)

    def codes(self, w_kn: np.ndarray, scales: np.ndarray) -> np.ndarray:
        codes = quant.quantize_weight(w_kn, scales, 1, self.bits)
        return quant.limit_pairs(codes, self.pair_limit) if self.paired else codes

    def fake_quant(self, w_kn: np.ndarray, scales: np.ndarray) -> np.ndarray:
        if self.paired:
            return self.dequantize(self.codes(w_kn, scales), scales)
        return quant.fake_quant(w_kn, np.asarray(scales, np.float32)[None, :], self.bits)

    @staticmethod
    def dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """``s_c * q`` in float32: :meth:`fake_quant` of the weight whose codes these are."""
        return quant.dequantize_weight(codes, scales, 1)

    @staticmethod
    def emit(graph: gs.Graph, layer: QuantizedLayer) -> gs.Variable:
        """``DequantizeLinear`` of the layer's codes as it stores them: int8 (zero point 0) or uint8 (``q + 128``,
        zero point 128)."""
        stored, zero_points = layer.stored
        out = gs.Variable(naming.of(layer.name, naming.WEIGHT_DEQUANTIZED), dtype=np.float32,
                          shape=list(layer.codes.shape))
        graph.nodes.append(gs.Node(
            "DequantizeLinear", name=naming.of(layer.name, naming.WEIGHT_DEQUANTIZE), attrs={"axis": 1},
            inputs=[constant(naming.of(layer.name, naming.WEIGHT_QUANTIZED), stored),
                    constant(naming.of(layer.name, naming.WEIGHT_SCALE), layer.scales.astype(np.float32)),
                    constant(naming.of(layer.name, naming.WEIGHT_ZERO_POINT), zero_points)],
            outputs=[out]))
        return out
