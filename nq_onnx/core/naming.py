"""The names nq-onnx gives the nodes and tensors it creates, and the one place that reads them back.

Every created name is ``{owner}/{part}``: the owner is a layer or a group name (:mod:`nq_onnx.passes.find_layers`),
the part one of the constants below. Passes and the summary learn what a pass created from its typed
:class:`~nq_onnx.passes.base.PassResult`; only a model read back from disk (``inspect``) is read by name, through
the functions at the end of this module, so that no other module matches name suffixes.
"""

from __future__ import annotations

# activation quantizer of a group
INPUT_CLIP = "input_clip"
INPUT_CLIPPED = "input_clipped"
INPUT_CLIP_MIN = "input_clip_min"
INPUT_CLIP_MAX = "input_clip_max"
INPUT_QUANTIZE = "input_quantize"
INPUT_QUANTIZED = "input_quantized"
INPUT_SCALE = "input_scale"
INPUT_ZERO_POINT = "input_zero_point"
# weight of a layer
WEIGHT_DEQUANTIZE = "weight_dequantize"
WEIGHT_DEQUANTIZED = "weight_dequantized"
WEIGHT_QUANTIZED = "weight_quantized"
WEIGHT_SCALE = "weight_scale"
WEIGHT_ZERO_POINT = "weight_zero_point"
# NoisyQuant
NOISE = "noise"
NOISY_INPUT = "noisy_input"
ADD_NOISE = "add_noise"
NOISE_FOLDED_BIAS = "noise_folded_bias"
BIAS_DENOISED = "bias_denoised"
MATMUL_OUTPUT = "matmul_output"
ADD_DENOISING_BIAS = "add_denoising_bias"
# LayerNorm reparameterization
REPARAM_GAMMA = "reparam_gamma"
REPARAM_BETA = "reparam_beta"
REPARAM_WEIGHT = "reparam_weight"
REPARAM_BIAS = "reparam_bias"
ADD_REPARAM_BIAS = "add_reparam_bias"
# channel balancing
BALANCE_MUL = "balance_mul"
BALANCE_FACTOR = "balance_factor"
BALANCED_INPUT = "balanced_input"
# attention reparameterization
ATTENTION_WEIGHT = "attention_weight"
ATTENTION_BIAS = "attention_bias"
ADD_ATTENTION_BIAS = "add_attention_bias"
# value balancing
VALUE_WEIGHT = "value_weight"
VALUE_BIAS = "value_bias"
ADD_VALUE_BIAS = "add_value_bias"
# zero bias before an activation
MATMUL_OUT = "matmul_out"
ZERO_BIAS = "zero_bias"
ADD_ZERO_BIAS = "add_zero_bias"


def of(owner: str, part: str) -> str:
    return f"{owner}/{part}"


def input_dequantize(layer: str, index: int | None) -> str:
    """The dequantizer of a layer's input: ``input_dequantize`` of a linear layer, ``input{i}_dequantize`` of
    operand ``i`` of an activation matmul."""
    return of(layer, "input_dequantize" if index is None else f"input{index}_dequantize")


def dequantized(dequantize_node: str) -> str:
    """The output tensor of a dequantizer node (``.../input_dequantize`` -> ``.../input_dequantized``)."""
    return dequantize_node + "d"


# reading a saved model back


def owner(name: str) -> str:
    """The layer or group that a created node or tensor belongs to."""
    return name.rsplit("/", 1)[0]


def is_noise_add(node_name: str) -> bool:
    return node_name.endswith("/" + ADD_NOISE)


def is_mlp_output(layer: str) -> bool:
    """A transformer MLP's second linear layer (timm's ``fc2``), whose input is the GELU output."""
    return layer.endswith("fc2")
