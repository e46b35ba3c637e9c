"""Value balancing (``--balance-values``): the attention output each projection reads divided per channel by factors
``r``, folded into the value columns of the layer that makes ``V``, and the projection's weight rows multiplied by
them, before the search (the rewrite is :mod:`nq_onnx.passes.balance_values`); the plan records each group's factors
(:attr:`nq_onnx.core.plan.GroupPlan.value_balance`), which a loaded plan folds in again.

The factors are channel balancing's (:func:`nq_onnx.techniques.balance_channels.factors`) over the projection
input's calibrated per-channel ranges, at strength ``--balance-values-alpha``::

    r_c = (h_c / mean(h)) ** alpha        h_c = max(|m_c|, |M_c|)

Unlike the GELU outputs' balancing it costs nothing at inference: no node is added. The calibrated ranges follow
exactly: the projection input's are ``[m / r, M / r]``, and the ``V`` operand of ``A @ V``, where it is quantized,
takes the range of its value columns divided by their factors (the columns' own ranges are calibrated for it).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from nq_onnx.calibration.collect import TensorStats
from nq_onnx.core.errors import ConfigError
from nq_onnx.core.options import option
from nq_onnx.core.technique import Context, Technique, register
from nq_onnx.core.timing import timed
from nq_onnx.passes.balance_values import BalanceValues, ValueSite, value_sites
from nq_onnx.passes.base import import_graph
from nq_onnx.techniques.balance_channels import balanced_stats, factors
from nq_onnx.techniques.refold import refold, rewrite_float


@dataclasses.dataclass(frozen=True)
class BalanceValuesSettings:
    VERSION: ClassVar[int] = 1

    balance_values: bool = dataclasses.field(default=False, metadata=option(
        "divide each attention output's channels by per-channel factors folded into the value columns of qkv, "
        "and multiply the projection's weight rows by them (SmoothQuant's migration; no node added)", "method"))
    balance_values_alpha: float = dataclasses.field(default=0.5, metadata=option(
        "strength of value balancing: factors (h / mean h) ** alpha of each channel's range h (0: none, 1: every "
        "channel the same range)", "method"))

    @property
    def enabled(self) -> bool:
        return self.balance_values

    def check(self, config) -> None:
        if not 0.0 <= self.balance_values_alpha <= 1.0:
            raise ConfigError(f"balance-values-alpha must be within [0, 1], got {self.balance_values_alpha}")


def operand_stats(site: ValueSite, r: np.ndarray, columns: TensorStats, count: int) -> TensorStats:
    """The per-tensor range of the balanced ``V`` operand, ``f x_v / r`` over its value columns (one value: the
    activation-matmul quantizers are per tensor)."""
    per_column = np.ones(columns.channel_min.size)
    per_column[site.v_columns] = r.astype(np.float64)
    cols = site.operand_columns
    ends = site.operand_factor * np.stack([columns.channel_min[cols], columns.channel_max[cols]]) / per_column[cols]
    return TensorStats(np.float32([ends.min()]), np.float32([ends.max()]), count)


@register
class ValueBalancing(Technique):
    name = "balance_values"
    settings = BalanceValuesSettings

    def tensors(self, ctx: Context) -> list[str]:
        """The outputs of the layers that make ``V``: their value columns' ranges give the ``V`` operand's. (The
        rewrites before this one keep these names: a bias ``Add`` they give a layer writes the tensor its
        ``MatMul`` wrote.)"""
        sites, _ = value_sites(import_graph(ctx.model), ctx.layers)
        return sorted({site.v_tensor for site in sites})

    def rewrite(self, ctx: Context) -> None:
        """Choose every site's factors from its projection input's ranges, fold them in, and carry the statistics
        over to the balanced tensors (the projection's input keeps its name: no node is added before it)."""
        alpha = self.settings_in(ctx.config).balance_values_alpha
        with timed(ctx.timings, "balance_values_s"):
            sites, _ = value_sites(import_graph(ctx.model), ctx.layers)
            chosen = {s.group: factors(ctx.stats[ctx.layers.group(s.group).tensor], alpha) for s in sites}
            result = rewrite_float(ctx, BalanceValues(ctx.layers, chosen))
            ctx.stats = dict(ctx.stats)
            for site in (s for s in sites if s.group in result.applied):
                r, tensor = chosen[site.group], ctx.layers.group(site.group).tensor
                ctx.stats[tensor] = balanced_stats(ctx.stats[tensor], r)
                if site.operand in ctx.stats:  # a quantized V operand: its range from the value columns'
                    ctx.stats[site.operand] = operand_stats(site, r, ctx.stats[site.v_tensor],
                                                            ctx.stats[site.operand].count)
            ctx.skipped += result.skipped
            ctx.state[self.name] = {name: chosen[name] for name in result.applied}

    def finish(self, ctx: Context) -> None:
        for name, r in ctx.state.get(self.name, {}).items():
            ctx.plan.groups[name].value_balance = r

    def replay(self, ctx: Context) -> None:
        chosen = {name: g.value_balance for name, g in ctx.plan.groups.items() if g.value_balance is not None}
        if chosen:
            refold(ctx, BalanceValues(ctx.layers, chosen), "group")
