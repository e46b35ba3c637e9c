"""The built-in techniques that plug into the pipeline's hooks, registered in this order (their hooks run in it)."""

from nq_onnx.techniques import reparam_layernorm  # noqa: F401  (registration: the LayerNorms first)
from nq_onnx.techniques import reparam_attention  # noqa: F401  (then the attention, on the rewritten model)
from nq_onnx.techniques import balance_channels  # noqa: F401  (then the GELU outputs)
from nq_onnx.techniques import balance_values  # noqa: F401  (and the attention outputs)
from nq_onnx.techniques import mixed_precision  # noqa: F401  (the widths, which the quantizers below are built at)
from nq_onnx.techniques import twin_uniform  # noqa: F401  (PTQ4ViT's quantizer first: the groups it takes ...)
from nq_onnx.techniques import split_softmax  # noqa: F401  (... the split attention-map quantizer ...)
from nq_onnx.techniques import asymmetric  # noqa: F401  (... the asymmetric quantizer leaves alone)
from nq_onnx.techniques import gptq  # noqa: F401  (a layer's codes first ...)
from nq_onnx.techniques import bias_correction  # noqa: F401  (... then the correction for them)

__all__ = ["reparam_layernorm", "reparam_attention", "balance_channels", "balance_values", "mixed_precision",
           "twin_uniform", "split_softmax", "asymmetric", "gptq", "bias_correction"]
