"""Bias correction (``bias_correction``): each layer's mean output error on the calibration rows, per output channel,
``E[f(X) - f_q(X)]``, added to its bias (``f_q`` with the activation quantizer, the noise and the final codes), kept
only where it lowers the layer's output error on the held-out rows.

The maths is :func:`nq_onnx.search.rounding.correction`; the plan stores the correction
(:attr:`nq_onnx.core.plan.LayerPlan.bias_correction`), which the denoising-bias pass adds to the layer's bias.
"""

from __future__ import annotations

from nq_onnx.core.technique import LayerFinish, Technique, register
from nq_onnx.search.rounding import correction


@register
class BiasCorrection(Technique):
    name = "bias_correction"

    def enabled(self, config) -> bool:
        return bool(config.bias_correction)

    def finish_layer(self, config, layer: LayerFinish) -> None:
        """The correction for the layer's final weight (after GPTQ's codes where those were kept)."""
        operand, checked = layer.operand, layer.checked
        candidate = correction(layer.rows, layer.noise, layer.act, layer.scale, operand.weight, operand.bias,
                               layer.weight)
        output = checked.output(layer.weight) if layer.output is None else layer.output
        before, after = checked.mse(output), checked.mse(output, candidate)
        layer.metrics["mse_before_bias_correction"], layer.metrics["mse_after_bias_correction"] = before, after
        if after < before:
            layer.correction = candidate
        else:
            layer.metrics["bias_correction_rejected"] = 1.0
