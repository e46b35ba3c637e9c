"""One quantized linear layer as the written model computes it, built once and read by every consumer.

A linear layer ``Y = X W + B`` with per-output-channel weight steps ``s_c`` and integer codes ``q`` (the nearest
codes of ``W / s_c``, or the plan's own: GPTQ's), under NoisyQuant with the fixed noise ``N`` of its input group and a
planned bias correction ``C``::

    Y = dq(q_A(X + N)) · dq(W_q) + B'        dq(W_q)[k, c] = q[k, c] · s_c
                                             B' = B - N · dq(W_q) + C

``dq(W_q)`` is computed from the codes and the float32 steps the model stores, in float64, so the bias the model
stores (``B'`` rounded once to float32) is the one the exact arithmetic gives. The codes are stored int8 with zero
point 0 or uint8 ``q + 128`` with zero point 128 (:func:`nq_onnx.core.quant.store_weight`): the same numbers, a
different onnxruntime kernel. The passes emit the layer from this value (its codes, steps and storage; its folded
bias) and the report reads its dequantized weight from it, so what is shown is what was written.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from nq_onnx.core import quant


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedLayer:
    """The emitted form of one linear layer (``[K, N]`` layout: ``K`` inputs, ``N`` output channels)."""

    name: str
    codes: np.ndarray  # int8 [K, N]
    scales: np.ndarray  # float32 [N]: s_c
    as_uint8: bool  # stored as uint8 q + 128 (exact U8U8 kernels), else int8
    noise: np.ndarray | None = None  # the input group's N [K] where the layer takes noise
    correction: np.ndarray | None = None  # C [N], the planned bias correction

    @property
    def weight(self) -> np.ndarray:
        """``dq(W_q) = q · s_c`` in float64 from the stored float32 steps, ``[K, N]`` (computed on each read, not
        kept: eight bytes a weight for every layer of a conversion would outweigh the model)."""
        steps = np.asarray(self.scales, np.float32).astype(np.float64)
        return self.codes.astype(np.float64) * steps.reshape(1, -1)

    @property
    def stored(self) -> tuple[np.ndarray, np.ndarray]:
        """``(stored codes, per-channel zero points)`` as the model holds them."""
        return quant.store_weight(self.codes, 1, self.as_uint8)

    @functools.cached_property
    def bias_delta(self) -> np.ndarray | None:
        """``B' - B = -N · dq(W_q) + C`` in float64, or ``None`` where the layer has neither noise nor a correction."""
        noisy = self.noise is not None and bool(np.any(self.noise))
        return bias_delta(self.noise.astype(np.float64) if noisy else None, self.weight,
                          None if self.correction is None else self.correction.astype(np.float64))

    def folded_bias(self, bias: np.ndarray | None) -> np.ndarray | None:
        """``B'`` in float32 for the layer's float bias ``B`` (``None``: no bias), or ``None`` where it is ``B``."""
        return None if self.bias_delta is None else folded_bias(bias, self.bias_delta)


def bias_delta(noise: np.ndarray | None, weight: np.ndarray, correction: np.ndarray | None) -> np.ndarray | None:
    """``-N · W + C`` in the arguments' precision (``W`` in ``[K, N]`` layout: ``dq(W_q)`` for a quantized layer),
    or ``None`` without ``N`` and ``C``: what NoisyQuant's denoising bias and a bias correction add to a bias. The
    emitted layers, the search's simulation and a pass folding into float weights all take it from here."""
    if noise is None and correction is None:
        return None
    delta = 0.0 if noise is None else quant.denoising_delta(noise, weight)
    return delta + (0.0 if correction is None else correction)


def folded_bias(bias: np.ndarray | None, delta: np.ndarray) -> np.ndarray:
    """``B + delta`` rounded once to float32 (``B`` ``None``: a layer without a bias gets ``delta``)."""
    if bias is None:
        return np.asarray(delta, np.float64).astype(np.float32)
    return (bias.astype(np.float64) + delta).astype(np.float32)
