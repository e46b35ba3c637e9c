"""The quantizers: each one's numpy arithmetic, its float-ONNX simulation and its emitted Q/DQ side by side.

The search scores candidates with :meth:`fake_quant` (numpy), the sequential simulation runs
:meth:`ActQuantizer.simulate` (float ONNX ops, one onnxruntime session for the whole search) and the
``insert_qdq`` pass writes :meth:`ActQuantizer.emit` / :meth:`WeightQuantizer.emit`. Keeping the three in one
class is what stops them drifting apart; ``tests/test_simulation.py`` checks the emitted graph against the
simulation layer by layer, ``tests/test_passes.py`` the emitted codes against :mod:`nq_onnx.quant` bit for bit.

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

from nq_onnx import quant
from nq_onnx import naming


def _constant(name: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(name, np.ascontiguousarray(values))


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """The emitted codes of one activation and the scale / zero-point constants its dequantizers share."""

    codes: gs.Variable
    scale: gs.Constant
    zero_point: gs.Constant


@dataclasses.dataclass(frozen=True)
class ActQuantizer:
    """Symmetric (scale-only) per-tensor uniform quantizer of an activation."""

    bits: int
    signed: bool = True

    @property
    def code_range(self) -> tuple[int, int]:
        return quant.code_range(self.bits, self.signed)

    @property
    def zero_point(self) -> int:
        return quant.zero_point(self.signed)

    @property
    def stored_range(self) -> tuple[int, int]:
        """The uint8 values the emitted ``QuantizeLinear`` can produce."""
        return quant.stored_code_range(self.bits, self.signed)

    def minmax_scale(self, absmax: float) -> float:
        return float(quant.minmax_scale(absmax, self.bits, self.signed))

    def fake_quant(self, x: np.ndarray, scale: float) -> np.ndarray:
        return quant.fake_quant(x, np.float32(scale), self.bits, self.signed)

    def codes(self, x: np.ndarray, scale: float) -> np.ndarray:
        return quant.quantize(x, np.float32(scale), self.bits, self.signed)

    def simulate(self, prefix: str, x: gs.Tensor, scale: gs.Tensor) -> tuple[list[gs.Node], gs.Variable]:
        """Float ONNX nodes computing :meth:`fake_quant` of ``x`` with a fed ``scale`` (the search's simulation)."""
        lo, hi = self.code_range
        t = [gs.Variable(f"{prefix}/t{i}", dtype=np.float32) for i in range(1, 5)]
        nodes = [
            gs.Node("Div", inputs=[x, scale], outputs=[t[0]]),
            gs.Node("Clip", inputs=[t[0], gs.Constant(f"{prefix}/lo", np.array(lo, np.float32)),
                                    gs.Constant(f"{prefix}/hi", np.array(hi, np.float32))], outputs=[t[1]]),
            gs.Node("Round", inputs=[t[1]], outputs=[t[2]]),
            gs.Node("Mul", inputs=[t[2], scale], outputs=[t[3]]),
        ]
        return nodes, t[3]

    def emit(self, graph: gs.Graph, group: str, source: gs.Tensor, scale: float) -> QuantizedTensor:
        """Append ``[Clip] -> QuantizeLinear`` of ``source`` to ``graph``; dequantize with :meth:`emit_dequantize`."""
        scale32 = np.float32(scale)
        shape = getattr(source, "shape", None)
        if self.bits < 8:
            lo, hi = self.code_range
            clipped = gs.Variable(naming.of(group, naming.INPUT_CLIPPED), dtype=np.float32, shape=shape)
            bounds = [_constant(naming.of(group, part), np.array(v * scale32, np.float32))
                      for part, v in ((naming.INPUT_CLIP_MIN, lo), (naming.INPUT_CLIP_MAX, hi))]
            graph.nodes.append(gs.Node("Clip", name=naming.of(group, naming.INPUT_CLIP),
                                       inputs=[source, *bounds], outputs=[clipped]))
            source = clipped
        codes = gs.Variable(naming.of(group, naming.INPUT_QUANTIZED), dtype=np.uint8, shape=shape)
        out = QuantizedTensor(codes, _constant(naming.of(group, naming.INPUT_SCALE), np.array(scale32, np.float32)),
                              _constant(naming.of(group, naming.INPUT_ZERO_POINT),
                                        np.array(self.zero_point, np.uint8)))
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
    """Symmetric per-output-channel uniform quantizer of a ``[K, N]`` weight (channels along axis 1)."""

    bits: int

    @property
    def code_range(self) -> tuple[int, int]:
        return quant.code_range(self.bits)

    def minmax_scales(self, w_kn: np.ndarray) -> np.ndarray:
        return quant.weight_scales(w_kn, axis=1, bits=self.bits)

    def codes(self, w_kn: np.ndarray, scales: np.ndarray) -> np.ndarray:
        return quant.quantize_weight(w_kn, scales, 1, self.bits)

    def fake_quant(self, w_kn: np.ndarray, scales: np.ndarray) -> np.ndarray:
        return quant.fake_quant(w_kn, np.asarray(scales, np.float32)[None, :], self.bits)

    @staticmethod
    def dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """``s_c * q`` in float32: :meth:`fake_quant` of the weight whose codes these are."""
        return quant.dequantize_weight(codes, scales, 1)

    @staticmethod
    def emit(graph: gs.Graph, layer: str, codes: np.ndarray, scales: np.ndarray, as_uint8: bool) -> gs.Variable:
        """``DequantizeLinear`` of the layer's codes stored as int8 (zero point 0) or uint8 (``q + 128``, 128)."""
        stored, zero_points = quant.store_weight(codes, 1, as_uint8)
        out = gs.Variable(naming.of(layer, naming.WEIGHT_DEQUANTIZED), dtype=np.float32, shape=list(codes.shape))
        graph.nodes.append(gs.Node(
            "DequantizeLinear", name=naming.of(layer, naming.WEIGHT_DEQUANTIZE), attrs={"axis": 1},
            inputs=[_constant(naming.of(layer, naming.WEIGHT_QUANTIZED), stored),
                    _constant(naming.of(layer, naming.WEIGHT_SCALE), scales.astype(np.float32)),
                    _constant(naming.of(layer, naming.WEIGHT_ZERO_POINT), zero_points)],
            outputs=[out]))
        return out
