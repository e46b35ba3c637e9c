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
from nq_onnx.passes.base import Skip, SkipKind, import_graph
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
        """The outputs of the layers that make ``V``: their value columns' ranges give the ``V`` operand's (kept by
        group, so that the rewrite reads the columns calibrated for its own site)."""
        sites, _ = value_sites(import_graph(ctx.model), ctx.layers)
        ctx.state[self.name] = {"columns": {site.group: site.v_tensor for site in sites}}
        return sorted({site.v_tensor for site in sites})

    def rewrite(self, ctx: Context) -> None:
        """Choose every site's factors from its projection input's ranges, fold them in, and carry the statistics
        over to the balanced tensors (a site whose quantized ``V`` operand has no calibrated value columns is left
        as it is, with the reason)."""
        alpha = self.settings_in(ctx.config).balance_values_alpha
        state = ctx.state.setdefault(self.name, {"columns": {}})
        with timed(ctx.timings, "balance_values_s"):
            sites, _ = value_sites(import_graph(ctx.model), ctx.layers)
            columns = {s.group: ctx.stats.get(state["columns"].get(s.group, "")) for s in sites}
            unknown = [s for s in sites if s.operand in ctx.stats and columns[s.group] is None]
            ctx.skipped += [Skip(s.group, "its value columns' ranges were not calibrated", SkipKind.UNSUPPORTED)
                            for s in unknown]
            sites = [s for s in sites if s not in unknown]
            chosen = {s.group: factors(ctx.stats[ctx.layers.group(s.group).tensor], alpha) for s in sites}
            old = {s.group: ctx.layers.group(s.group).tensor for s in sites}
            result = rewrite_float(ctx, BalanceValues(ctx.layers, chosen))
            ctx.stats = dict(ctx.stats)
            for site in (s for s in sites if s.group in result.applied):
                r = chosen[site.group]
                ctx.stats[ctx.layers.group(site.group).tensor] = balanced_stats(ctx.stats[old[site.group]], r)
                if site.operand in ctx.stats:  # a quantized V operand: its range from the value columns'
                    ctx.stats[site.operand] = operand_stats(site, r, columns[site.group],
                                                            ctx.stats[site.operand].count)
            ctx.skipped += result.skipped
            state["factors"] = {name: chosen[name] for name in result.applied}

    def finish(self, ctx: Context) -> None:
        for name, r in ctx.state.get(self.name, {}).get("factors", {}).items():
            ctx.plan.groups[name].value_balance = r

    def replay(self, ctx: Context) -> None:
        chosen = {name: g.value_balance for name, g in ctx.plan.groups.items() if g.value_balance is not None}
        if chosen:
            refold(ctx, BalanceValues(ctx.layers, chosen), "group")
