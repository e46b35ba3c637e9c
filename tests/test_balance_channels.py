"""Channel balancing (``--balance-channels``, on by default): the rewritten float model computes the original, the
balanced GELU output's channel ranges are the ones the factors promise and it is still a GELU output to the
quantizers, a 6-bit conversion with it has a lower output error on held-out inputs than the same conversion without
it, and a saved plan reapplies it byte for byte."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import init, make_model, run, save, tensor
from onnx import helper

from nq_onnx import QuantConfig, SearchConfig, convert
from nq_onnx.calibration.collect import TensorStats, collect_stats
from nq_onnx.calibration.data import load_dataset
from nq_onnx.core.errors import ConfigError
from nq_onnx.core.plan import Plan
from nq_onnx.core.two_range import TwinSoftmax
from nq_onnx.passes import Role
from nq_onnx.passes.base import rewrite_model
from nq_onnx.report.summary import format_summary
from nq_onnx.passes.balance_channels import BalanceChannels
from nq_onnx.pipeline import canonicalize, discover
from nq_onnx.techniques.balance_channels import balanced_stats, candidates, factors

TOKENS, K, HIDDEN, OUT = 16, 16, 64, 12


def gelu_mlp(rng: np.random.Generator) -> onnx.ModelProto:
    """``x -> fc1 -> GELU (erf form, as timm exports it) -> fc2``, fc1's columns scaled over two decades so that the
    GELU output's channels have very different ranges, as a trained ViT's do."""
    spread = np.logspace(-1, 1, HIDDEN)
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.w"], ["h0"], name="/mlp/fc1/MatMul"),
        helper.make_node("Add", ["fc1.b", "h0"], ["h1"], name="/mlp/fc1/Add"),
        helper.make_node("Div", ["h1", "sqrt2"], ["d"], name="/mlp/act/Div"),
        helper.make_node("Erf", ["d"], ["e"], name="/mlp/act/Erf"),
        helper.make_node("Add", ["e", "one"], ["e1"], name="/mlp/act/Add"),
        helper.make_node("Mul", ["h1", "e1"], ["m"], name="/mlp/act/Mul"),
        helper.make_node("Mul", ["m", "half"], ["g"], name="/mlp/act/Mul_1"),
        helper.make_node("MatMul", ["g", "fc2.w"], ["y0"], name="/mlp/fc2/MatMul"),
        helper.make_node("Add", ["y0", "fc2.b"], ["y"], name="/mlp/fc2/Add"),
    ]
    inits = [init("fc1.w", rng.standard_normal((K, HIDDEN)) / np.sqrt(K) * spread),
             init("fc1.b", rng.standard_normal(HIDDEN) * 0.1 * spread),
             init("fc2.w", rng.standard_normal((HIDDEN, OUT)) / np.sqrt(HIDDEN)),
             init("fc2.b", rng.standard_normal(OUT)),
             init("sqrt2", np.sqrt(2.0)), init("one", 1.0), init("half", 0.5)]
    return make_model(nodes, [tensor("x", ["batch", TOKENS, K])], [tensor("y", ["batch", TOKENS, OUT])], inits)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """``(folder, model path, calibration .npy, held-out inputs)``: calibration and held-out inputs disjoint."""
    folder = tmp_path_factory.mktemp("balance")
    rng = np.random.default_rng(0)
    path = save(gelu_mlp(rng), folder / "mlp.onnx")
    calib = folder / "calib.npy"
    np.save(calib, rng.standard_normal((32, TOKENS, K)).astype(np.float32))
    held = np.random.default_rng(1).standard_normal((64, TOKENS, K)).astype(np.float32)
    return folder, path, calib, held


def test_factors_follow_the_migration_strength():
    """``r = (h / mean(h)) ** alpha`` with ``h`` the larger end of each channel's range; a constant-zero channel
    keeps 1; ``alpha = 0`` changes nothing."""
    stats = TensorStats(np.array([-0.1, -0.17, 0.0, -2.0], np.float32), np.array([3.0, 0.5, 0.0, 1.0], np.float32), 10)
    h = np.array([3.0, 0.5, 0.0, 2.0])
    np.testing.assert_allclose(factors(stats, 0.5), [(3 / 1.375) ** 0.5, (0.5 / 1.375) ** 0.5, 1.0, (2 / 1.375) ** 0.5],
                               rtol=1e-6)
    np.testing.assert_array_equal(factors(stats, 0.0), np.ones(4, np.float32))
    balanced = balanced_stats(stats, factors(stats, 1.0))
    np.testing.assert_allclose(np.maximum(-balanced.channel_min, balanced.channel_max)[h > 0], h.mean(), rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.25, 1.0])
def test_balanced_model_computes_the_original_with_the_promised_ranges(mlp, alpha):
    """The float model read through ``Mul(X, 1 / r)`` with ``diag(r) W`` computes the original outputs (float
    rounding only), and its balanced tensor's channel ranges are the original ones divided by ``r``: the ratio of
    the widest to the narrowest channel shrinks from ``rho`` to ``rho ** (1 - alpha)``."""
    _, path, calib, held = mlp
    model = canonicalize(onnx.load(str(path)))
    layers = discover(model, QuantConfig())
    data = load_dataset(calib, model, limit=32, seed=0)
    stats = collect_stats(model, [g.tensor for g in layers.groups], data, 8)
    chosen = candidates(layers, stats, alpha)
    assert list(chosen) == ["mlp.fc2"]  # the GELU output only: fc1 reads the model input
    out, result = rewrite_model(model, BalanceChannels(layers, chosen))
    assert result.names(Role.BALANCED) == ["mlp.fc2"] and not result.skipped
    want, got = run(model, {"x": held})[0], run(out, {"x": held})[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    group = discover(out, QuantConfig()).group("mlp.fc2")
    assert group.tensor == "mlp.fc2/balanced_input" and group.after == "gelu"
    before = stats[layers.group("mlp.fc2").tensor]
    after = collect_stats(out, [group.tensor], data, 8)[group.tensor]
    np.testing.assert_allclose(after.channel_max, before.channel_max / chosen["mlp.fc2"], rtol=1e-5)
    width = lambda s: np.maximum(-s.channel_min, s.channel_max)  # noqa: E731
    rho = width(before).max() / width(before).min()
    assert rho > 20
    np.testing.assert_allclose(width(after).max() / width(after).min(), rho ** (1 - alpha), rtol=1e-4)


def _held_out_mse(path, model, held) -> float:
    want = run(onnx.load(str(model)), {"x": held})[0]
    return float(np.mean((run(onnx.load(str(path)), {"x": held})[0] - want) ** 2))


def _config(**kw) -> QuantConfig:
    return QuantConfig(**(dict(method="easyquant", w_bits=6, a_bits=6, calib_size=32, balance_channels=False,
                               search=SearchConfig(search_images=16, holdout_images=8, tokens=256, shift_min_rows=16))
                          | kw))


def test_a_6_bit_conversion_with_balancing_has_a_lower_held_out_error(mlp):
    """EasyQuant at W6A6, calibrated on 32 inputs: on 64 other inputs, balancing the GELU output at strength 0.5
    gives less than 0.85x the output MSE of the same conversion without it (the per-tensor step no longer rounds
    the narrow channels away), and the written model has the Mul and runs on integer kernels."""
    folder, path, calib, held = mlp
    convert(path, folder / "plain.onnx", calib, _config(), evaluate=False)
    convert(path, folder / "bal.onnx", calib,
            _config(balance_channels=True, balance_alpha=0.5), evaluate=False)
    ratio = _held_out_mse(folder / "bal.onnx", path, held) / _held_out_mse(folder / "plain.onnx", path, held)
    assert ratio < 0.85, ratio
    ops = [n.op_type for n in onnx.load(str(folder / "bal.onnx")).graph.node]
    assert ops.count("Mul") == 3  # the GELU's two and the balancing one


def test_a_saved_plan_reapplies_the_balancing_byte_for_byte(mlp):
    folder, path, calib, _ = mlp
    config = _config(method="noisyquant", balance_channels=True)
    first = convert(path, folder / "a.onnx", calib, config, save_plan=folder / "plan.json", evaluate=False)
    assert first.summary.balanced_groups == 1
    assert "balanced: 1 GELU output, read through a Mul" in format_summary(first.summary, 1.0, "a.onnx")
    plan = Plan.load(folder / "plan.json")
    assert plan.groups["mlp.fc2"].balance.shape == (HIDDEN,)
    assert json.loads((folder / "plan.json").read_text())["schema_version"] == 6
    convert(path, folder / "b.onnx", load_plan=folder / "plan.json", evaluate=False)
    assert (folder / "a.onnx").read_bytes() == (folder / "b.onnx").read_bytes()
    plain = _config()
    convert(path, folder / "c.onnx", calib, plain, save_plan=folder / "plain.json", evaluate=False)
    assert json.loads((folder / "plain.json").read_text())["schema_version"] == 4  # without balancing: as before


def test_it_is_on_by_default_and_a_strength_outside_0_1_is_refused_in_one_line():
    assert QuantConfig().balance_channels and QuantConfig().balance_alpha == 0.25
    assert not QuantConfig.preset("paper").balance_channels and not QuantConfig.preset("accurate").balance_channels
    with pytest.raises(ConfigError, match="balance-alpha must be between 0 and 1, got 1.5"):
        QuantConfig(balance_alpha=1.5)


def test_twin_uniform_gelu_quantizer_takes_the_balanced_range(mlp):
    """With a twin-uniform method the balanced GELU output keeps its twin quantizer, whose negative range's step
    covers the balanced tensor's calibrated minimum (``m / r`` of the narrowest channel), not GELU's own."""
    folder, path, calib, _ = mlp
    config = _config(method="ptq4vit", balance_channels=True, balance_alpha=1.0)
    convert(path, folder / "twin.onnx", calib, config, save_plan=folder / "twin.json", evaluate=False)
    group = Plan.load(folder / "twin.json").groups["mlp.fc2"]
    assert group.balance is not None and group.twin is not None and group.twin.kind == "gelu"
    model = canonicalize(onnx.load(str(path)))
    layers = discover(model, QuantConfig())
    stats = collect_stats(model, [layers.group("mlp.fc2").tensor], load_dataset(calib, model, limit=32, seed=0), 8)
    low = float((stats[layers.group("mlp.fc2").tensor].channel_min / group.balance).min())
    assert low < -0.2  # beyond GELU's own minimum, -0.17
    np.testing.assert_allclose(group.twin.fixed, -low / TwinSoftmax(6).twin.levels, rtol=1e-5)
