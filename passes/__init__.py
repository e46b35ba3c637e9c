"""Graph rewrites. Each pass edits an onnx-graphsurgeon graph and never runs a model."""

from nq_onnx.passes.add_zero_bias import AddZeroBias
from nq_onnx.passes.base import (
    GraphPass,
    PassConditionError,
    PassResult,
    Role,
    Sequential,
    Skip,
    SkipKind,
    import_graph,
)
from nq_onnx.passes.decompose_gemm import DecomposeGemm
from nq_onnx.passes.fold_weight_chains import FoldWeightChains
from nq_onnx.passes.find_layers import ACT_MATMUL, LINEAR, GroupSpec, Layers, LayerSpec, find_layers
from nq_onnx.passes.fold_denoising_bias import FoldDenoisingBias
from nq_onnx.passes.insert_noise import InsertNoise
from nq_onnx.passes.insert_qdq import InsertQDQ
from nq_onnx.passes.quantized_layers import quantized_layers
from nq_onnx.passes.store_int16_bias import StoreInt16Bias

__all__ = [
    "AddZeroBias",
    "ACT_MATMUL",
    "LINEAR",
    "DecomposeGemm",
    "FoldDenoisingBias",
    "FoldWeightChains",
    "GraphPass",
    "GroupSpec",
    "InsertNoise",
    "InsertQDQ",
    "Layers",
    "LayerSpec",
    "PassConditionError",
    "PassResult",
    "Role",
    "Sequential",
    "Skip",
    "SkipKind",
    "StoreInt16Bias",
    "find_layers",
    "import_graph",
    "quantized_layers",
]
