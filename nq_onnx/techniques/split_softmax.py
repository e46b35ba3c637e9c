"""The split attention-map quantizer (``--split-softmax``): every Softmax output read as the ``A`` of ``A @ V`` is
quantized as two uniform unsigned tensors that add up, a fine one saturating at a searched knee and a coarse one of
what lies above it, each with its own integer matmul and no float select
(:class:`~nq_onnx.core.two_range.SplitSoftmax`: the arithmetic, its float-ONNX simulation and its Q/DQ form).

The search chooses the fine step ``d1`` among the uniform quantizer's candidates and ``d2 / 2^(m/2)`` (the coarse
step ``d2 = 1 / (2^b - 1)`` is fixed) on the partly quantized model's rows, like any activation matmul's step, and
keeps the split only where its product error on the held-out images' rows is strictly below the group's uniform
quantizer's (``SearchPlanner._plan_act_matmul``; the plan's metrics say ``split_rejected`` where it lost); the plan
records it as a :class:`~nq_onnx.core.plan.TwinSpec` of kind ``split``. The split needs the attention map quantized
(``--attention-probabilities``), a searched method with uniform quantizers (a twin-uniform method takes the same
maps) and uint8 codes, which the ``gpu`` target's symmetric int8 activations exclude.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from nq_onnx.core.config import Method, MixedSensitivity, Target
from nq_onnx.core.errors import ConfigError
from nq_onnx.core.options import option
from nq_onnx.core.plan import TwinSpec
from nq_onnx.core.quantizers import ActQuantizer
from nq_onnx.core.two_range import SplitSoftmax
from nq_onnx.core.technique import GroupQuantizer, Technique, register
from nq_onnx.passes.find_layers import ACT_MATMUL


@dataclasses.dataclass(frozen=True)
class SplitSoftmaxSettings:
    VERSION: ClassVar[int] = 1

    split_softmax: bool = dataclasses.field(default=False, metadata=option(
        "quantize each attention map A of A@V as two uniform tensors that add up (a fine range below a searched "
        "knee, a coarse one above it), each on its own integer matmul, no float select; needs "
        "--attention-probabilities. Costs a Sub and a second integer matmul per attention layer", "target"))

    @property
    def enabled(self) -> bool:
        return self.split_softmax

    def check(self, config) -> None:
        """Refuse the split where it could not apply: no quantized attention map, a method that searches nothing
        or whose twin-uniform quantizer takes the same maps, a target that cannot store its codes, or a
        mixed-precision sensitivity that simulates every group as uniform."""
        if not config.quantize_attention_matmuls:
            raise ConfigError("split-softmax splits the quantized attention map of A@V: drop --no-attention-matmuls")
        if not config.attention_probabilities:
            raise ConfigError("split-softmax splits the quantized attention map of A@V: add --attention-probabilities")
        if config.method.twin or config.method == Method.MINMAX:
            raise ConfigError(f"split-softmax needs a searched method with uniform quantizers (easyquant or "
                              f"noisyquant), not {config.method.value}")
        if config.target == Target.GPU:
            raise ConfigError("target gpu cannot run split-softmax: its codes are unsigned uint8, and TensorRT fuses "
                              "symmetric int8 only")
        if config.bits_budget is not None and config.mixed_sensitivity == MixedSensitivity.SEARCHED:
            raise ConfigError("mixed-sensitivity searched simulates every group as uniform; with split-softmax use "
                              "another sensitivity")


@register
class SplitSoftmaxTechnique(Technique):
    name = "split_softmax"
    settings = SplitSoftmaxSettings
    group = "target"

    def group_quantizers(self, config, layers, stats, bits, unsigned, chosen) -> dict[str, GroupQuantizer]:
        """Each attention-map group no technique before this one took, with its uniform quantizer as the fallback
        it must beat."""
        out = {}
        for group in layers.groups:
            readers = [layers.layer(name) for name in group.consumers]
            if group.after != "softmax" or group.name in chosen:
                continue
            if all(r.kind == ACT_MATMUL and r.inputs[0] == group.tensor for r in readers):
                width = bits.get(group.name, config.a_bits)
                split = SplitSoftmax(width)
                out[group.name] = GroupQuantizer(split, ActQuantizer(width, group.name not in unsigned),
                                                 ("split", "uniform"), TwinSpec("split", split.fixed))
        return out
