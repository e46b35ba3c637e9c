"""LayerNorm reparameterization (``QuantConfig.reparam``): every LayerNorm-fed group's channels brought to one range
before the search, folded exactly into the LayerNorm and the layers that read it.

The factors and their maths are in :mod:`nq_onnx.reparam` (the choice) and :mod:`nq_onnx.passes.reparam_layernorm`
(the rewrite); the plan records each group's factors (:attr:`nq_onnx.plan.GroupPlan.reparam`), which a loaded plan
folds in again.
"""

from __future__ import annotations

from nq_onnx import reparam
from nq_onnx.errors import PlanError
from nq_onnx.layers import discover
from nq_onnx.summary import timed
from nq_onnx.techniques.base import Context, Technique, register


@register
class LayerNormReparam(Technique):
    name = "reparam"

    def enabled(self, config) -> bool:
        return bool(config.reparam)

    def rewrite(self, ctx: Context) -> None:
        """Choose every candidate group's factors from its calibrated ranges, fold them in, and carry the statistics
        over to the rewritten tensors (exactly: :func:`nq_onnx.reparam.reparameterized_stats`)."""
        with timed(ctx.timings, "reparam_s"):
            candidates, few_rows = reparam.candidates(ctx.layers, ctx.stats, ctx.config.search.shift_min_rows)
            ctx.model, result = reparam.reparameterize(ctx.model, ctx.layers, candidates)
            ctx.layers = discover(ctx.model, ctx.config)
            factors = {name: candidates[name] for name in result.applied}
            tensors = {ctx.layers.group(name).tensor: factor for name, factor in factors.items()}
            ctx.stats = {t: reparam.reparameterized_stats(s, tensors[t]) if t in tensors else s
                         for t, s in ctx.stats.items()}
            ctx.skipped += few_rows + result.skipped
            ctx.state[self.name] = factors

    def finish(self, ctx: Context) -> None:
        for name, factor in ctx.state.get(self.name, {}).items():
            ctx.plan.groups[name].reparam = factor

    def replay(self, ctx: Context) -> None:
        factors = {name: g.reparam for name, g in ctx.plan.groups.items() if g.reparam is not None}
        if factors:
            ctx.model, result = reparam.reparameterize(ctx.model, ctx.layers, factors)
            ctx.layers = discover(ctx.model, ctx.config)
            if result.skipped:
                raise PlanError(f"plan does not fit the model: group {result.skipped[0].layer!r} cannot be "
                                f"reparameterized ({result.skipped[0].reason})")
