"""Asymmetric activations (``activations = asymmetric``, the default off the ``gpu`` target): uint8 codes anchored at
the calibrated minimum for every positively skewed group.

A group whose calibrated minimum ``m`` is negative but small against its maximum ``M`` (``-m <= SKEW * M``: a GELU
output, ``>= -0.17``) takes :class:`~nq_onnx.core.quantizers.ActQuantizer` with ``low = m``: codes
``q = clip(round(x / s) + z, 0, 2^b - 1)`` with the zero point ``z = round(-m / s)`` following the searched step
``s``, where a symmetric range would spend nearly half its codes on values the tensor never takes. NoisyQuant's noise
and its denoising bias are unchanged by it: the noise is added before the quantizer, whatever its zero point, and
``B' = B - N dq(W)`` depends on the weights alone. A group keeps it only where it beats the symmetric quantizer of its
width on held-out rows; the plan records ``low`` (:attr:`nq_onnx.core.plan.GroupPlan.low`).
"""

from __future__ import annotations

import numpy as np

from nq_onnx.core.config import SKEW, Activations
from nq_onnx.core.quantizers import ActQuantizer
from nq_onnx.core.technique import GroupQuantizer, Technique, register


@register
class AsymmetricActivations(Technique):
    name = "asymmetric"

    def enabled(self, config) -> bool:
        return config.activations == Activations.ASYMMETRIC

    def group_quantizers(self, config, layers, stats, bits, unsigned, chosen) -> dict[str, GroupQuantizer]:
        """The skewed groups no technique before this one took (module docstring)."""
        out = {}
        for group in layers.groups:
            tensor = stats[group.tensor]
            low, high = float(tensor.channel_min.min()), float(tensor.channel_max.max())
            if low < 0 and -low <= SKEW * high and group.name not in chosen:
                width = bits.get(group.name, config.a_bits)
                out[group.name] = GroupQuantizer(ActQuantizer(width, signed=False, low=float(np.float32(low))),
                                                 ActQuantizer(width), ("asymmetric", "symmetric"))
        return out
