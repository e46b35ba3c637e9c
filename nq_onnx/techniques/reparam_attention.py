"""Attention reparameterization (``QuantConfig.reparam_attention``): each K channel centred (the Softmax ignores the
shift) and each Q/K channel pair balanced, folded exactly into the layers that make Q and K, before the search.

The factors come from the calibrated ranges of the columns of the layers that produce ``Q`` and ``K``
(:func:`attention_factors`), which also give the rewritten operands' ranges (:func:`attention_operand_stats`); the
sites and the rewrite are :mod:`nq_onnx.passes.reparam_attention`. The plan records each scores matmul's factors
(:attr:`nq_onnx.core.plan.LayerPlan.attention`), which a loaded plan folds in again.
"""

from __future__ import annotations

import numpy as np
import onnx

from nq_onnx.calibration.collect import TensorStats
from nq_onnx.core.errors import NQError
from nq_onnx.core.plan import AttentionReparam as Factors
from nq_onnx.core.technique import Context, Technique, register
from nq_onnx.core.timing import timed
from nq_onnx.passes.base import PassResult, import_graph, rewrite_model
from nq_onnx.passes.find_layers import Layers, discover
from nq_onnx.passes.reparam_attention import AttentionSite, ReparamAttention, attention_sites
from nq_onnx.techniques.refold import refold


def attention_factors(site: AttentionSite, stats: dict[str, TensorStats]) -> Factors:
    """K centred on its calibrated mid-range and each Q/K channel pair balanced
    (:mod:`nq_onnx.passes.reparam_attention`).

    With ``[m, M]`` the calibrated range of a K channel, ``c = (m + M) / 2`` and ``h = (M - m) / 2``, and ``a`` the
    absolute maximum of its Q partner, ``s = sqrt(h / a)`` gives both channels the range ``sqrt(a h)`` (times the
    scalars on their way to the scores): the smallest common bound of a pair whose product is fixed. ``s = 1`` where
    either channel is constant zero."""
    q, k = stats[site.q_tensor], stats[site.k_tensor]
    q_low, q_high = q.channel_min[site.q_columns].astype(np.float64), q.channel_max[site.q_columns].astype(np.float64)
    k_low, k_high = k.channel_min[site.k_columns].astype(np.float64), k.channel_max[site.k_columns].astype(np.float64)
    centre, half = (k_low + k_high) / 2.0, (k_high - k_low) / 2.0
    absmax = np.maximum(np.abs(q_low), np.abs(q_high))
    ok = (half > 0) & (absmax > 0)
    scale = np.sqrt(np.where(ok, half, 1.0) / np.where(ok, absmax, 1.0))
    return Factors(scale.astype(np.float32), centre.astype(np.float32))


def attention_operand_stats(site: AttentionSite, factor: Factors,
                            stats: dict[str, TensorStats]) -> tuple[TensorStats, TensorStats]:
    """The calibrated per-tensor ranges of the rewritten ``Q'`` and ``K'`` operands, from their columns' ranges (one
    value each: the activation-matmul quantizers are per tensor). ``Q' = f_q s x_q`` and
    ``K' = f_k (x_k - c) / s`` for each pair, with ``f`` the scalars on the way."""
    def tensor_range(low: np.ndarray, high: np.ndarray, count: int) -> TensorStats:
        ends = np.stack([low, high])
        return TensorStats(np.float32([ends.min()]), np.float32([ends.max()]), count)

    s, c = factor.scale.astype(np.float64), factor.shift.astype(np.float64)
    q, k = stats[site.q_tensor], stats[site.k_tensor]
    q_ends = site.q_factor * s * np.stack([q.channel_min[site.q_columns], q.channel_max[site.q_columns]])
    k_ends = site.k_factor / s * (np.stack([k.channel_min[site.k_columns], k.channel_max[site.k_columns]]) - c)
    return tensor_range(q_ends.min(0), q_ends.max(0), q.count), tensor_range(k_ends.min(0), k_ends.max(0), k.count)


def reparameterize_attention(model: onnx.ModelProto, layers: Layers,
                             factors: dict[str, Factors]) -> tuple[onnx.ModelProto, PassResult]:
    """The float model with the attention ``factors`` folded in (see :func:`reparameterize`)."""
    return rewrite_model(model, ReparamAttention(layers, factors))


@register
class AttentionReparameterization(Technique):
    name = "reparam_attention"

    def enabled(self, config) -> bool:
        return bool(config.reparam_attention)

    def tensors(self, ctx: Context) -> list[str]:
        """The outputs of the layers that make Q and K: their columns' ranges give the factors."""
        sites, kept = attention_sites(import_graph(ctx.model), ctx.layers)
        ctx.state[self.name] = {"sites": sites, "kept": kept, "factors": {}}
        return [t for s in sites for t in (s.q_tensor, s.k_tensor)]

    def rewrite(self, ctx: Context) -> None:
        """Fold every site's factors into the model; the rewritten Q and K operands' ranges follow from their
        columns'."""
        state = ctx.state[self.name]
        if not state["sites"]:
            return
        with timed(ctx.timings, "reparam_attention_s"):
            factors = {site.layer: attention_factors(site, ctx.stats) for site in state["sites"]}
            ctx.model, result = reparameterize_attention(ctx.model, ctx.layers, factors)
            if result.skipped:  # the sites were found on the same graph: a skip here is a bug, not a model to refuse
                raise NQError(f"attention reparameterization of {result.skipped[0].layer} failed: "
                              f"{result.skipped[0].reason}")
            ctx.layers = discover(ctx.model, ctx.config)
            ctx.stats = dict(ctx.stats)
            for site in state["sites"]:
                spec = ctx.layers.layer(site.layer)
                ctx.stats[spec.inputs[0]], ctx.stats[spec.inputs[1]] = attention_operand_stats(
                    site, factors[site.layer], ctx.stats)
            ctx.skipped += state["kept"]
            state["factors"] = factors

    def finish(self, ctx: Context) -> None:
        for name, factor in ctx.state[self.name]["factors"].items():
            ctx.plan.layers[name].attention = factor

    def replay(self, ctx: Context) -> None:
        factors = {name: p.attention for name, p in ctx.plan.layers.items() if p.attention is not None}
        if factors:
            refold(ctx, ReparamAttention(ctx.layers, factors), "layer")
