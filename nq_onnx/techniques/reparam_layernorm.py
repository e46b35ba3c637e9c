"""LayerNorm reparameterization (``QuantConfig.reparam``): every LayerNorm-fed group's channels brought to one range
before the search, folded exactly into the LayerNorm and the layers that read it (the rewrite is
:mod:`nq_onnx.passes.reparam_layernorm`); the plan records each group's factors
(:attr:`nq_onnx.core.plan.GroupPlan.reparam`), which a loaded plan folds in again.

For a group whose calibrated per-channel range is ``[m_k, M_k]``, with centre ``c_k = (m_k + M_k) / 2`` and
half-width ``h_k = (M_k - m_k) / 2``, the factors are ::

    r_k = h_k / mean(h)        (r_k = 1 where h_k = 0: a constant channel, which the shift sends to 0)

so that ``X' = (X - c) / r`` has every channel in ``[-mean(h), mean(h)]``: one symmetric per-tensor step fits all
of them, as RepQ-ViT's per-channel-to-per-tensor reparameterization does for its asymmetric quantizer (its target
is the mean of the channels' steps). The calibrated ranges of ``X'`` follow exactly, ``[(m - c) / r, (M - c) / r]``,
so no second calibration pass is needed.
"""

from __future__ import annotations

import numpy as np
import onnx

from nq_onnx.calibration.collect import TensorStats
from nq_onnx.core.plan import Reparam
from nq_onnx.core.technique import Context, Technique, register
from nq_onnx.core.timing import timed
from nq_onnx.passes.base import PassResult, Skip, SkipKind, rewrite_model
from nq_onnx.passes.find_layers import Layers, discover
from nq_onnx.passes.reparam_layernorm import ReparamLayerNorm
from nq_onnx.techniques.refold import refold


def choose(stats: TensorStats) -> Reparam:
    """Factors that give every channel the mean half-width, centred on zero (module docstring)."""
    low, high = stats.channel_min.astype(np.float64), stats.channel_max.astype(np.float64)
    centre, half = (low + high) / 2.0, (high - low) / 2.0
    target = float(half.mean())
    scale = np.where(half > 0, half / target, 1.0) if target > 0 else np.ones_like(half)
    return Reparam(scale.astype(np.float32), centre.astype(np.float32))


def reparameterized_stats(stats: TensorStats, reparam: Reparam) -> TensorStats:
    """The calibrated ranges of ``X' = (X - c) / r`` (``r > 0`` keeps min below max)."""
    r, c = reparam.scale, reparam.shift
    low, high = ((stats.channel_min - c) / r).astype(np.float32), ((stats.channel_max - c) / r).astype(np.float32)
    return TensorStats(low, high, stats.count)


def reparameterize(model: onnx.ModelProto, layers: Layers,
                   factors: dict[str, Reparam]) -> tuple[onnx.ModelProto, PassResult]:
    """The float model with ``factors`` folded in; the pass result says which groups were rewritten and why others
    were not. Find the layers again on the returned model: their weights and biases are new constants."""
    return rewrite_model(model, ReparamLayerNorm(layers, factors))


def candidates(layers: Layers, stats: dict[str, TensorStats],
               min_rows: int = 0) -> tuple[dict[str, Reparam], list[Skip]]:
    """Factors for every group read only by linear layers whose ranges were calibrated on at least ``min_rows``
    rows (the pass refuses those not fed by a LayerNorm), and the groups left out for too few rows. A range from
    few rows (a pooled head sees one per image) is too loose to centre and scale on: held-out rows beyond it would
    be clipped, as for NoisyQuant's shift."""
    factors, skipped = {}, []
    for g in layers.groups:
        if not g.noisy or g.channels <= 1:
            continue
        count = stats[g.tensor].count
        if count >= min_rows:
            factors[g.name] = choose(stats[g.tensor])
        else:
            skipped.append(Skip(g.name, f"calibrated on fewer than {min_rows} rows ({count})",
                                SkipKind.NOT_REPARAMETERIZED))
    return factors, skipped


@register
class LayerNormReparameterization(Technique):
    name = "reparam"

    def enabled(self, config) -> bool:
        return bool(config.reparam)

    def rewrite(self, ctx: Context) -> None:
        """Choose every candidate group's factors from its calibrated ranges, fold them in, and carry the statistics
        over to the rewritten tensors (exactly: :func:`reparameterized_stats`)."""
        with timed(ctx.timings, "reparam_s"):
            chosen, few_rows = candidates(ctx.layers, ctx.stats, ctx.config.search.shift_min_rows)
            ctx.model, result = reparameterize(ctx.model, ctx.layers, chosen)
            ctx.layers = discover(ctx.model, ctx.config)
            factors = {name: chosen[name] for name in result.applied}
            tensors = {ctx.layers.group(name).tensor: factor for name, factor in factors.items()}
            ctx.stats = {t: reparameterized_stats(s, tensors[t]) if t in tensors else s
                         for t, s in ctx.stats.items()}
            ctx.skipped += few_rows + result.skipped
            ctx.state[self.name] = factors

    def finish(self, ctx: Context) -> None:
        for name, factor in ctx.state.get(self.name, {}).items():
            ctx.plan.groups[name].reparam = factor

    def replay(self, ctx: Context) -> None:
        factors = {name: g.reparam for name, g in ctx.plan.groups.items() if g.reparam is not None}
        if factors:
            refold(ctx, ReparamLayerNorm(ctx.layers, factors), "group")
