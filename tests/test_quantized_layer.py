"""One value per quantized linear layer: what the written model stores is what the value says, bit for bit, and the
report reads the same dequantized weights (GPTQ's codes, not the nearest ones)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import mlp_model
from onnx import numpy_helper

from nq_onnx import QuantConfig
from nq_onnx.calibration.data import Dataset
from nq_onnx.core import naming
from nq_onnx.core.quantized_layer import QuantizedLayer
from nq_onnx.passes import import_graph, quantized_layers
from nq_onnx.pipeline import quantize
from nq_onnx.report.page import _dequantized_weights

SEARCH = dict(act_alphas=(0.3, 1.0, 12), weight_alphas=(0.5, 1.0, 9), rounds=1, search_images=4, holdout_images=2,
              tokens=64, shift_min_rows=16)


@pytest.fixture(scope="module")
def converted():
    rng = np.random.default_rng(3)
    model = mlp_model(rng, tokens=6, k=16, hidden=32, out=10, second_bias=False)
    x = rng.standard_normal((12, 6, 16)).astype(np.float32)
    x[:, :, 3] *= 8
    config = QuantConfig(method="noisyquant", w_bits=6, a_bits=6, weight_rounding="gptq", bias_correction=True,
                         reparam=False, activations="symmetric", calib_size=12, search=SEARCH)
    return quantize(model, "digest", config, calib=Dataset(("x",), arrays={"x": x}))


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
    assert values["mlp.fc1"].bias_delta is None  # the search kept fc1 without noise, GPTQ or a correction
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
    value = QuantizedLayer("l", codes, scales, 8, as_uint8=True, noise=noise, correction=correction)
    want = -(noise.astype(np.float64) @ (codes.astype(np.float64) * scales.astype(np.float64))) + correction
    np.testing.assert_array_equal(value.bias_delta, want)
    assert QuantizedLayer("l", codes, scales, 8, as_uint8=False).bias_delta is None
    assert QuantizedLayer("l", codes, scales, 8, as_uint8=False, noise=np.zeros(5, np.float32)).folded_bias(None) \
        is None
    stored_codes, zero_points = value.stored
    assert stored_codes.dtype == np.uint8 and (zero_points == 128).all()
    np.testing.assert_array_equal(stored_codes.astype(np.int16) - 128, codes)
