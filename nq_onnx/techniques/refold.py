"""What the reparameterizations share when a loaded plan is applied: their recorded factors folded into the float
model again, and the layers found again on the rewritten model."""

from __future__ import annotations

from nq_onnx.core.errors import PlanError
from nq_onnx.core.technique import Context
from nq_onnx.passes.base import rewrite_model
from nq_onnx.passes.find_layers import discover


def refold(ctx: Context, graph_pass, what: str) -> None:
    """Run ``graph_pass`` (a reparameterization holding the plan's factors) on ``ctx``'s float model and find its
    layers again; a factor the model cannot take means the plan is another model's: a PlanError naming the
    ``what`` (``group``, ``layer``) it belongs to."""
    ctx.model, result = rewrite_model(ctx.model, graph_pass)
    ctx.layers = discover(ctx.model, ctx.config)
    if result.skipped:
        raise PlanError(f"plan does not fit the model: {what} {result.skipped[0].layer!r} cannot be "
                        f"reparameterized ({result.skipped[0].reason})")
