"""What the reparameterizations share: a rewrite of the float model followed by finding its layers again (its layers'
weights and biases are new constants), and, when a loaded plan is applied, its recorded factors folded in again."""

from __future__ import annotations

from nq_onnx.core.errors import PlanError
from nq_onnx.core.technique import Context
from nq_onnx.passes.base import PassResult, rewrite_model
from nq_onnx.passes.find_layers import discover


def rewrite_float(ctx: Context, graph_pass) -> PassResult:
    """Run ``graph_pass`` on ``ctx``'s float model and find its layers again; the pass's result."""
    ctx.model, result = rewrite_model(ctx.model, graph_pass)
    ctx.layers = discover(ctx.model, ctx.config)
    return result


def refold(ctx: Context, graph_pass, what: str) -> None:
    """Run ``graph_pass`` (a reparameterization holding the plan's factors) on ``ctx``'s float model and find its
    layers again; a factor the model cannot take means the plan is another model's: a PlanError naming the
    ``what`` (``group``, ``layer``) it belongs to."""
    result = rewrite_float(ctx, graph_pass)
    if result.skipped:
        raise PlanError(f"plan does not fit the model: {what} {result.skipped[0].layer!r} cannot be "
                        f"reparameterized ({result.skipped[0].reason})")
