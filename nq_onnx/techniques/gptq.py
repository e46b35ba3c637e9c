"""GPTQ weight rounding (``weight_rounding = gptq`` or ``gptq-act``): each layer's codes chosen input channel by
input channel, every rounding error pushed onto the channels not yet rounded through the inverse input Hessian, and
kept only where the layer's output error on the held-out rows is lower than with nearest rounding.

The maths (GPTQ, its blocked Cholesky form, and ``gptq-act``'s fit to the float output from the layer's quantized
input) is in :mod:`nq_onnx.search.rounding`; the plan stores the codes
(:attr:`nq_onnx.core.plan.LayerPlan.weight_codes`).
"""

from __future__ import annotations

from nq_onnx.core.config import WeightRounding
from nq_onnx.core.quantizers import WeightQuantizer
from nq_onnx.core.technique import LayerFinish, Technique, register
from nq_onnx.search.rounding import gptq_codes, layer_error


@register
class GPTQ(Technique):
    name = "gptq"

    def enabled(self, config) -> bool:
        return config.weight_rounding in (WeightRounding.GPTQ, WeightRounding.GPTQ_ACT)

    def finish_layer(self, config, layer: LayerFinish) -> None:
        """GPTQ's codes on ``X + N`` (``gptq``) or fitted from the quantized input ``dq(q(X + N)) - N`` to ``X W``
        (``gptq-act``), kept where the checked rows' output MSE is the lower; both errors in the metrics."""
        operand, scales, n, checked = layer.operand, layer.scales, layer.checked.noise, layer.checked
        if config.weight_rounding == WeightRounding.GPTQ:
            candidate = gptq_codes(operand.weight, scales, layer.rows + n, operand.quantizer.bits,
                                   pair_limit=operand.quantizer.pair_limit)
        else:  # the layer as it runs: dq(q(X + N)) - N in, X W wanted
            candidate = gptq_codes(operand.weight, scales, layer.act.fake_quant(layer.rows + n, layer.scale) - n,
                                   operand.quantizer.bits, target=layer.rows, pair_limit=operand.quantizer.pair_limit)
        w_gptq = WeightQuantizer.dequantize(candidate, scales)
        metrics = layer.metrics
        metrics["weight_error_nearest"] = layer_error(checked.noisy_input, operand.weight, layer.weight)
        metrics["weight_error_gptq"] = layer_error(checked.noisy_input, operand.weight, w_gptq)
        output, output_gptq = checked.output(layer.weight), checked.output(w_gptq)
        metrics["mse_nearest"] = checked.mse(output)
        metrics["mse_gptq"] = checked.mse(output_gptq)
        if metrics["mse_gptq"] < metrics["mse_nearest"]:
            layer.codes, layer.weight, layer.output = candidate, w_gptq, output_gptq
        else:
            layer.output = output
            metrics["gptq_rejected"] = 1.0
