"""PTQ4ViT's twin-uniform quantizer (methods ``ptq4vit`` and ``noisyquant-ptq4vit``): which groups take it.

Every Softmax output read as the ``A`` of ``A @ V`` and every GELU output read by linear layers is quantized with two
uniform ranges instead of one (:class:`~nq_onnx.core.two_range.TwinSoftmax`, :class:`~nq_onnx.core.two_range.
TwinGelu`: the arithmetic, its float-ONNX simulation and its Q/DQ form). A Softmax group's fixed step is
``d2 = 1 / L``; a GELU group's negative range's step ``d1`` covers its calibrated minimum ``m < 0`` with ``L`` levels,
``d1 = max(-m, 1e-6) / L``; the search chooses the other step (the group's ``scale``). Each twin group is kept only
where it beats the group's uniform quantizer on held-out rows (:func:`nq_onnx.search.groups.search_with_fallback`);
the plan records it as :class:`~nq_onnx.core.plan.TwinSpec`.
"""

from __future__ import annotations

import numpy as np

from nq_onnx.calibration.collect import TensorStats
from nq_onnx.core.config import QuantConfig
from nq_onnx.core.plan import TwinSpec
from nq_onnx.core.quantizers import ActQuantizer
from nq_onnx.core.two_range import TwinSoftmax
from nq_onnx.core.technique import GroupQuantizer, Technique, register
from nq_onnx.passes.find_layers import ACT_MATMUL, Layers


def twin_specs(layers: Layers, stats: dict[str, TensorStats], config: QuantConfig,
               bits: dict[str, int] | None = None) -> dict[str, TwinSpec]:
    """The twin-uniform groups and their fixed steps (module docstring). ``bits``: a group's bits where they are not
    ``config.a_bits`` (mixed precision)."""
    out = {}
    for group in layers.groups:
        softmax = TwinSoftmax((bits or {}).get(group.name, config.a_bits))
        readers = [layers.layer(name) for name in group.consumers]
        if group.after == "softmax" and all(r.kind == ACT_MATMUL and r.inputs[0] == group.tensor for r in readers):
            out[group.name] = TwinSpec("softmax", softmax.fixed)
        elif group.after == "gelu" and group.noisy:
            low = -float(stats[group.tensor].channel_min.min())
            out[group.name] = TwinSpec("gelu", float(np.float32(max(low, 1e-6) / softmax.twin.levels)))
    return out


@register
class TwinUniform(Technique):
    name = "twin_uniform"

    def enabled(self, config) -> bool:
        return bool(config.method.twin)

    def group_quantizers(self, config, layers, stats, bits, unsigned, chosen) -> dict[str, GroupQuantizer]:
        """Each twin group's quantizer, with the uniform one of its width as the fallback it must beat."""
        out = {}
        for name, spec in twin_specs(layers, stats, config, bits).items():
            width = bits.get(name, config.a_bits)
            out[name] = GroupQuantizer(spec.quantizer(width), ActQuantizer(width, name not in unsigned),
                                       ("twin", "uniform"), spec)
        return out
