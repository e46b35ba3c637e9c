"""Asymmetric activations (``activations = asymmetric``, the default off the ``gpu`` target): uint8 codes anchored at
the calibrated minimum for every positively skewed group.

A group whose calibrated minimum ``m`` is negative but small against its maximum ``M`` (``-m <= SKEW * M``: a GELU
output, ``>= -0.17``) takes :class:`~nq_onnx.core.quantizers.ActQuantizer` with ``low = m``: codes
``q = clip(round(x / s) + z, 0, 2^b - 1)`` with the zero point ``z = round(-m / s)`` following the searched step
``s``, where a symmetric range would spend nearly half its codes on values the tensor never takes. NoisyQuant's noise
and its denoising bias are unchanged by it: the noise is added before the quantizer, whatever its zero point, and
``B' = B - N dq(W)`` depends on the weights alone. A group keeps it only where it beats the symmetric quantizer of its
width on held-out rows; the plan records ``low`` (:attr:`nq_onnx.core.plan.GroupPlan.low`).

The symmetric fallback is searched with NoisyQuant's noise width but without its mean shift (``b = 0``). The shift
is the symmetric quantizer's way of serving a one-sided tensor, as the zero point is the asymmetric one's: it centres
every channel on its calibrated mid-range. Where a few tokens set a channel's range (the class token's outlier
channel in a ViT's GELU output), centring on that mid-range moves the channel's other values, every patch token's,
to the edge of the symmetric range, where they clip; the clipping is a constant the search's rows and bias correction
account for on calibration images, and an error that moves with the input distribution elsewhere. On held-out rows
of the calibration images the shifted fallback can still win by a few percent, and on the real ViT-S/14 such a win
on one fc2 input multiplied the model's output error on CIFAR-10 images (calibrated on ImageNet) at W6A6. Against
the unshifted symmetric quantizer the check still catches an asymmetric quantizer that loses.
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
                                                 ActQuantizer(width), ("asymmetric", "symmetric"),
                                                 fallback_shifts=(0.0,))
        return out
