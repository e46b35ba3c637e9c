"""Channel balancing (``QuantConfig.balance_channels``, on by default): every GELU output read by linear layers divided
per channel by factors ``r`` in an explicit ``Mul``, and its layers' weight rows multiplied by them, before the
search (the rewrite is :mod:`nq_onnx.passes.balance_channels`); the plan records each group's factors
(:attr:`nq_onnx.core.plan.GroupPlan.balance`), which a loaded plan applies again.

For a group whose calibrated per-channel range is ``[m_k, M_k]``, with ``h_k = max(|m_k|, |M_k|)``, the factors
are ::

    r_k = (h_k / mean(h)) ** alpha        (r_k = 1 where h_k = 0)

``alpha = 0`` changes nothing; ``alpha = 1`` gives every channel the same range, which moves all of the activation's
spread into the weight rows, where a per-output-channel weight step then serves the small rows badly; between them
(SmoothQuant's migration strength) both operands keep some. The calibrated ranges of ``X' = X / r`` follow exactly,
``[m / r, M / r]``, so no second calibration pass is needed. The ``Mul`` costs one elementwise pass over the GELU
output per block. The balanced tensor is still a GELU output to the quantizers that treat one specially
(PTQ4ViT's twin-uniform GELU quantizer takes its calibrated minimum, now the balanced one's).
"""

from __future__ import annotations

import numpy as np

from nq_onnx.calibration.collect import TensorStats
from nq_onnx.core.technique import Context, Technique, register
from nq_onnx.core.timing import timed
from nq_onnx.passes.balance_channels import BalanceChannels
from nq_onnx.passes.find_layers import Layers
from nq_onnx.techniques.refold import refold, rewrite_float


def factors(stats: TensorStats, alpha: float) -> np.ndarray:
    """``r = (h / mean(h)) ** alpha`` over the channels (module docstring), as float32."""
    half = np.maximum(np.abs(stats.channel_min), np.abs(stats.channel_max)).astype(np.float64)
    target = float(half.mean())
    if target <= 0:
        return np.ones_like(half, dtype=np.float32)
    return np.where(half > 0, (half / target) ** alpha, 1.0).astype(np.float32)


def candidates(layers: Layers, stats: dict[str, TensorStats], alpha: float) -> dict[str, np.ndarray]:
    """Factors for every GELU-output group read only by linear layers."""
    return {g.name: factors(stats[g.tensor], alpha) for g in layers.groups
            if g.after == "gelu" and g.noisy and g.channels > 1}


def balanced_stats(stats: TensorStats, r: np.ndarray) -> TensorStats:
    """The calibrated ranges of ``X' = X / r`` (``r > 0`` keeps min below max)."""
    return TensorStats((stats.channel_min / r).astype(np.float32), (stats.channel_max / r).astype(np.float32),
                       stats.count)


@register
class ChannelBalancing(Technique):
    name = "balance_channels"

    def enabled(self, config) -> bool:
        return bool(config.balance_channels)

    def rewrite(self, ctx: Context) -> None:
        """Choose every GELU group's factors from its calibrated ranges, insert them, and carry the statistics over
        to the balanced tensors (exactly: :func:`balanced_stats`)."""
        with timed(ctx.timings, "balance_s"):
            chosen = candidates(ctx.layers, ctx.stats, ctx.config.balance_alpha)
            old = {name: ctx.layers.group(name).tensor for name in chosen}
            result = rewrite_float(ctx, BalanceChannels(ctx.layers, chosen))
            for name in result.applied:
                ctx.stats[ctx.layers.group(name).tensor] = balanced_stats(ctx.stats[old[name]], chosen[name])
            ctx.skipped += result.skipped
            ctx.state[self.name] = {name: chosen[name] for name in result.applied}

    def finish(self, ctx: Context) -> None:
        for name, r in ctx.state.get(self.name, {}).items():
            ctx.plan.groups[name].balance = r

    def replay(self, ctx: Context) -> None:
        chosen = {name: g.balance for name, g in ctx.plan.groups.items() if g.balance is not None}
        if chosen:
            refold(ctx, BalanceChannels(ctx.layers, chosen), "group")
