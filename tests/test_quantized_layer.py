"""One value per quantized linear layer: what the written model stores is what the value says, bit for bit, and the
report reads the same dequantized weights (GPTQ's codes, not the nearest ones)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import mlp_model
from onnx import numpy_helper

from nq_onnx import QuantConfig
from nq_onnx.core import naming, quant
from nq_onnx.core.plan import GroupPlan, LayerPlan, Plan
from nq_onnx.core.quantized_layer import QuantizedLayer
from nq_onnx.passes import FoldDenoisingBias, InsertNoise, InsertQDQ, find_layers, import_graph, quantized_layers
from nq_onnx.pipeline import apply_plan, canonicalize
from nq_onnx.report.page import _dequantized_weights


@pytest.fixture(scope="module")
def converted():
    """The MLP (fc1 with a bias, fc2 without) under a plan made by hand: fc1's group without noise, fc2's with noise,
    codes that are not the nearest ones (as GPTQ's) and a bias correction."""
    rng = np.random.default_rng(3)
    model = canonicalize(mlp_model(rng, tokens=6, k=16, hidden=32, out=10, second_bias=False))
    layers = find_layers(import_graph(model))
    weights = stored(model)
    plan = Plan("digest", QuantConfig(w_bits=6, a_bits=6))
    for group in layers.groups:
        noise = rng.uniform(-0.1, 0.1, group.channels).astype(np.float32) if group.name == "mlp.fc2" else None
        plan.groups[group.name] = GroupPlan(group.name, group.tensor, 0.05, 6, noise)
    for spec in layers.layers:
        w = weights[spec.weight]
        plan.layers[spec.name] = LayerPlan(spec.name, quant.weight_scales(w, 1, 6), 6)
    fc2 = plan.layers["mlp.fc2"]
    codes = quant.quantize_weight(weights["fc2.w"], fc2.weight_scales, 1, 6).astype(np.int16)
    codes[::3] = np.clip(codes[::3] + 1, -32, 31)  # moved off the nearest code
    fc2.weight_codes = codes.astype(np.int8)
    fc2.bias_correction = rng.standard_normal(10).astype(np.float32) * 0.01
    quantized, _ = apply_plan(model, layers, plan)
    return SimpleNamespace(model=quantized, float_model=model, layers=layers, plan=plan)


def stored(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_the_written_model_stores_each_layers_value(converted):
    values = quantized_layers(import_graph(converted.float_model), converted.layers, converted.plan)
    weights = stored(converted.model)
    assert set(values) == {"mlp.fc1", "mlp.fc2"}
    for name, value in values.items():
        codes, zero_points = value.stored
        np.testing.assert_array_equal(weights[naming.of(name, naming.WEIGHT_QUANTIZED)], codes)
        np.testing.assert_array_equal(weights[naming.of(name, naming.WEIGHT_ZERO_POINT)], zero_points)
        np.testing.assert_array_equal(weights[naming.of(name, naming.WEIGHT_SCALE)], value.scales)
        assert value.codes.min() >= -32 and value.codes.max() <= 31  # 6-bit codes
    assert values["mlp.fc1"].bias_delta is None  # no noise, no correction: the bias is left as it was
    np.testing.assert_array_equal(weights["fc1.b"], stored(converted.float_model)["fc1.b"])
    assert values["mlp.fc2"].noise is not None and values["mlp.fc2"].correction is not None
    added = weights[naming.of("mlp.fc2", naming.BIAS_DENOISED)]  # fc2 had no bias: -N dq(W) + C is one
    np.testing.assert_array_equal(added, values["mlp.fc2"].folded_bias(None))


def test_the_value_holds_gptq_codes_not_the_nearest_ones(converted):
    plan = converted.plan.layers["mlp.fc2"]
    assert plan.weight_codes is not None
    values = quantized_layers(import_graph(converted.float_model), converted.layers, converted.plan)
    w = stored(converted.float_model)["fc2.w"]
    nearest = np.clip(np.round(w / plan.weight_scales), -32, 31)
    assert np.count_nonzero(values["mlp.fc2"].codes != nearest) > 0  # GPTQ moved some codes
    reported, _ = _dequantized_weights(converted, ["mlp.fc2"])["mlp.fc2"]
    written = stored(converted.model)
    dq = (written[naming.of("mlp.fc2", naming.WEIGHT_QUANTIZED)].astype(np.float64)
          - written[naming.of("mlp.fc2", naming.WEIGHT_ZERO_POINT)].astype(np.float64)) \
        * written[naming.of("mlp.fc2", naming.WEIGHT_SCALE)].astype(np.float64)
    np.testing.assert_array_equal(reported, dq.astype(np.float32))


def test_bias_delta_is_minus_noise_times_the_dequantized_weight_plus_the_correction():
    rng = np.random.default_rng(0)
    codes = rng.integers(-128, 128, (5, 3)).astype(np.int8)
    scales = np.array([0.1, 0.02, 0.3], np.float32)
    noise, correction = rng.standard_normal(5).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    value = QuantizedLayer("l", codes, scales, as_uint8=True, noise=noise, correction=correction)
    want = -(noise.astype(np.float64) @ (codes.astype(np.float64) * scales.astype(np.float64))) + correction
    np.testing.assert_array_equal(value.bias_delta, want)
    assert QuantizedLayer("l", codes, scales, as_uint8=False).bias_delta is None
    assert QuantizedLayer("l", codes, scales, as_uint8=False, noise=np.zeros(5, np.float32)).folded_bias(None) \
        is None
    stored_codes, zero_points = value.stored
    assert stored_codes.dtype == np.uint8 and (zero_points == 128).all()
    np.testing.assert_array_equal(stored_codes.astype(np.int16) - 128, codes)


def test_the_bias_folded_from_the_values_equals_the_one_folded_from_the_graphs_weights(converted):
    """The denoising bias from each layer's value and from the dequantized weights the graph holds after
    ``insert_qdq``: the same bytes."""
    layers, plan = converted.layers, converted.plan
    exported = []
    for values in (quantized_layers(import_graph(converted.float_model), layers, plan), None):
        graph = import_graph(converted.float_model)
        for graph_pass in (InsertNoise(layers, plan), InsertQDQ(layers, plan),
                           FoldDenoisingBias(layers, plan, values)):
            graph_pass(graph)
        graph.cleanup().toposort()
        exported.append(stored(gs.export_onnx(graph)))
    assert exported[0].keys() == exported[1].keys()
    for name in exported[0]:
        np.testing.assert_array_equal(exported[0][name], exported[1][name])

