"""Attention reparameterization (``QuantConfig.reparam_attention``): each K channel centred (the Softmax ignores the
shift) and each Q/K channel pair balanced, folded exactly into the layers that make Q and K, before the search.

The factors and their maths are in :mod:`nq_onnx.reparam` (:func:`~nq_onnx.reparam.attention_factors`) and
:mod:`nq_onnx.passes.reparam_attention` (the sites and the rewrite); the plan records each scores matmul's factors
(:attr:`nq_onnx.plan.LayerPlan.attention`), which a loaded plan folds in again.
"""

from __future__ import annotations

from nq_onnx import reparam
from nq_onnx.errors import NQError, PlanError
from nq_onnx.layers import discover
from nq_onnx.passes.base import import_graph
from nq_onnx.passes.reparam_attention import attention_sites
from nq_onnx.summary import timed
from nq_onnx.techniques.base import Context, Technique, register


@register
class AttentionReparam(Technique):
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
            factors = {site.layer: reparam.attention_factors(site, ctx.stats) for site in state["sites"]}
            ctx.model, result = reparam.reparameterize_attention(ctx.model, ctx.layers, factors)
            if result.skipped:  # the sites were found on the same graph: a skip here is a bug, not a model to refuse
                raise NQError(f"attention reparameterization of {result.skipped[0].layer} failed: "
                              f"{result.skipped[0].reason}")
            ctx.layers = discover(ctx.model, ctx.config)
            ctx.stats = dict(ctx.stats)
            for site in state["sites"]:
                spec = ctx.layers.layer(site.layer)
                ctx.stats[spec.inputs[0]], ctx.stats[spec.inputs[1]] = reparam.attention_operand_stats(
                    site, factors[site.layer], ctx.stats)
            ctx.skipped += state["kept"]
            state["factors"] = factors

    def finish(self, ctx: Context) -> None:
        for name, factor in ctx.state[self.name]["factors"].items():
            ctx.plan.layers[name].attention = factor

    def replay(self, ctx: Context) -> None:
        factors = {name: p.attention for name, p in ctx.plan.layers.items() if p.attention is not None}
        if factors:
            ctx.model, result = reparam.reparameterize_attention(ctx.model, ctx.layers, factors)
            ctx.layers = discover(ctx.model, ctx.config)
            if result.skipped:
                raise PlanError(f"plan does not fit the model: layer {result.skipped[0].layer!r} cannot be "
                                f"reparameterized ({result.skipped[0].reason})")
