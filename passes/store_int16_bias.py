"""Store NoisyQuant's noise ``N`` and denoised biases ``B'`` as INT16 codes (the paper's integer-only form).

Every float constant the noise passes wrote (the explicit ``N``, a LayerNorm beta or bias with ``N`` folded in,
each denoised bias ``B' = B - dq(W_q) N``) becomes::

    DequantizeLinear(codes, s, 0)      codes = clip(round(v / s), -32767, 32767) : int16,   s = max|v| / 32767

a symmetric per-tensor int16 quantizer (opset 21 Q/DQ types), so the model holds no float bias that NoisyQuant
introduced. The rounding error per element is at most ``s / 2 = max|v| / 65534``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from nq_onnx.core import quant
from nq_onnx.passes.base import GraphPass, PassResult, Role, constant

# what the noise passes created or changed: the constants this pass stores as int16
ROLES = (Role.NOISE, Role.NOISE_FOLDED, Role.BIAS_DENOISED, Role.BIAS_ADDED)


def int16_codes(values: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Symmetric 16-bit MinMax codes: with ``s = max|v| / 32767`` they stay in ``[-32767, 32767]``."""
    scale = np.float32(quant.minmax_scale(np.abs(values).max(), 16))
    return quant.quantize(values, scale, 16).astype(np.int16), scale


@dataclasses.dataclass(frozen=True)
class StoreInt16Bias(GraphPass):
    """``tensors``: the float constants to store, by name (the :data:`ROLES` of the noise passes' results)."""

    tensors: frozenset[str] = frozenset()

    def __call__(self, graph: gs.Graph) -> PassResult:
        result = PassResult(graph)
        done: dict[str, gs.Variable] = {}
        for node in list(graph.nodes):
            for i, tensor in enumerate(node.inputs):
                if not isinstance(tensor, gs.Constant) or tensor.values.dtype != np.float32:
                    continue
                if tensor.name not in self.tensors:
                    continue
                if tensor.name not in done:
                    codes, scale = int16_codes(tensor.values)
                    out = gs.Variable(f"{tensor.name}_int16_dequantized", dtype=np.float32, shape=list(codes.shape))
                    graph.nodes.append(gs.Node(
                        "DequantizeLinear", name=f"{tensor.name}_int16_dequantize",
                        inputs=[constant(f"{tensor.name}_int16", codes),
                                constant(f"{tensor.name}_int16_scale", np.array(scale, np.float32)),
                                constant(f"{tensor.name}_int16_zero_point", np.array(0, np.int16))],
                        outputs=[out]))
                    done[tensor.name] = out
                    result.applied.append(tensor.name)
                    result.record(Role.INT16_CODES, tensor.name)
                node.inputs[i] = done[tensor.name]
        return result
