"""Value balancing (``--balance-values``): the attention output's channels divided by factors folded into the value
columns, the projection's rows multiplied by them. The rewritten float model computes the original (timm's ViT at
opset 17 and 13, DeiT, Swin's window attention, the demo's ViT-S/14 with separate q, k and v layers); the balanced
ranges are the ones the factors promise, for the projection's input and for the ``V`` operand of ``A @ V``; on the
demo's real weights the 6-bit error of every projection falls on held-out crops; a saved plan reapplies it byte for
byte; a site whose attention output is read by anything else is refused with the reason."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import run
from test_reparam import MODELS, exported

from nq_onnx import QuantConfig, SearchConfig, convert
from nq_onnx.calibration.collect import collect_stats, float_values
from nq_onnx.calibration.data import Dataset, Preprocess
from nq_onnx.core.errors import ConfigError
from nq_onnx.core.quantizers import ActQuantizer
from nq_onnx.demo import EVAL_PHOTOS, crops, demo_model_path, demo_photos
from nq_onnx.export import export_timm
from nq_onnx.io.model_io import load_model
from nq_onnx.passes import import_graph
from nq_onnx.passes.balance_values import BalanceValues, value_sites
from nq_onnx.passes.base import rewrite_model
from nq_onnx.pipeline import canonicalize, discover
from nq_onnx.report.summary import format_summary
from nq_onnx.techniques.balance_channels import balanced_stats, factors
from nq_onnx.techniques.balance_values import BalanceValuesSettings, operand_stats

ON = BalanceValuesSettings(balance_values=True)


def rewrite(model: onnx.ModelProto, data: Dataset, alpha: float = 0.5):
    """The model with every site balanced, the layers, sites, calibration statistics (the groups' inputs, the value
    layers' outputs and the ``V`` operands) and the factors."""
    layers = discover(model, QuantConfig(attention_probabilities=True))
    sites, refused = value_sites(import_graph(model), layers)
    assert sites and not refused
    tensors = sorted({t for s in sites for t in (layers.group(s.group).tensor, s.v_tensor, s.operand)})
    stats = collect_stats(model, tensors, data, 8)
    chosen = {s.group: factors(stats[layers.group(s.group).tensor], alpha) for s in sites}
    out, result = rewrite_model(model, BalanceValues(layers, chosen))
    assert sorted(result.applied) == sorted(chosen) and not result.skipped
    return out, layers, sites, stats, chosen


@pytest.fixture(scope="module", params=sorted(MODELS))
def family(request, tmp_path_factory, photo_folder):
    model, data = exported(request.param, tmp_path_factory.mktemp(request.param), photo_folder)
    return (request.param, model, data) + rewrite(model, data)


def test_the_rewritten_model_computes_the_original_on_real_images(family):
    name, model, data, out, *_ = family
    feeds = {k: v for batch in data.batches(16) for k, v in batch.items()}
    want, got = run(model, feeds)[0], run(out, feeds)[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), name
    def computing(m):  # the nodes that compute (a constant behind Identity may be folded away)
        return sorted(n.op_type for n in m.graph.node if n.op_type != "Identity")

    assert computing(out) == computing(model)  # folded: no node added


def test_the_balanced_ranges_are_the_ones_the_factors_promise(family):
    """The projection input's channel ranges are the original ones divided by ``r``; the ``V`` operand's per-tensor
    range is what :func:`operand_stats` computes from the value columns' ranges."""
    name, model, data, out, layers, sites, stats, chosen = family
    for site in sites:
        tensor = layers.group(site.group).tensor
        after = collect_stats(out, [tensor, site.operand], data, 8)
        want = balanced_stats(stats[tensor], chosen[site.group])
        np.testing.assert_allclose(after[tensor].channel_max, want.channel_max, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(after[tensor].channel_min, want.channel_min, rtol=1e-4, atol=1e-6)
        promised = operand_stats(site, chosen[site.group], stats[site.v_tensor], 1)
        measured = after[site.operand]
        np.testing.assert_allclose([measured.channel_min.min(), measured.channel_max.max()],
                                   [promised.channel_min[0], promised.channel_max[0]], rtol=1e-4, atol=1e-6)


def test_the_6_bit_error_of_every_projection_falls_on_held_out_real_activations():
    """The demo's ViT-S/14 (real weights): per-tensor 6-bit MinMax activations and per-channel 6-bit weights of each
    projection, factors from 24 calibration crops at the default strength, the output error on 8 held-out crops:
    lower in every block, and by a quarter on the geometric mean."""
    model = canonicalize(load_model(demo_model_path())[0])
    pre = Preprocess.from_model(model, crop_pct=1.0)
    photos, name = demo_photos(), model.graph.input[0].name
    fit = Dataset((name,), arrays={name: crops(photos[EVAL_PHOTOS:], pre, 0)[:24]})
    held = {name: crops(photos[:EVAL_PHOTOS], pre, 1)[:8]}
    out, layers, sites, stats, chosen = rewrite(model, fit)
    assert len(sites) == 12
    inputs = [layers.group(s.group).tensor for s in sites]
    before, after = float_values(model, inputs, held), float_values(out, inputs, held)
    act, weights = ActQuantizer(6, True), {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}

    def error(x, w, absmax):
        w_q = np.round(w / (np.abs(w).max(0) / 31)).clip(-31, 31) * (np.abs(w).max(0) / 31)
        return float(np.mean((act.fake_quant(x, act.minmax_scale(absmax)) @ w_q - x @ w) ** 2))

    ratios = []
    for site, tensor in zip(sites, inputs):
        spec = layers.layer(layers.group(site.group).consumers[0])
        w, r = weights[spec.weight].astype(np.float64), chosen[site.group].astype(np.float64)
        balanced = balanced_stats(stats[tensor], chosen[site.group]).absmax
        ratios.append(error(after[tensor], r[:, None] * w, balanced) / error(before[tensor], w, stats[tensor].absmax))
    assert max(ratios) < 1.0, ratios
    assert np.exp(np.mean(np.log(ratios))) < 0.75, ratios


def test_a_saved_plan_reapplies_value_balancing_without_calibration(tmp_path, photo_folder):
    """The factors are recorded in the plan (schema 7); converting with the saved plan and no images gives the same
    bytes; the same conversion without value balancing writes the schema it wrote before."""
    path = tmp_path / "vit.onnx"
    export_timm("vit_small_patch16_224", path, model_kwargs=dict(img_size=32, depth=2), num_classes=10)
    search = SearchConfig(search_images=4, holdout_images=2, tokens=64, shift_min_rows=16)
    config = QuantConfig(calib_size=8, w_bits=6, a_bits=6, attention_probabilities=True, techniques=(ON,),
                         search=search)
    first = convert(path, tmp_path / "a.onnx", photo_folder, config, save_plan=tmp_path / "plan.json", evaluate=False)
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["schema_version"] == 7 and sum("value_balance" in g for g in doc["groups"]) == 2
    convert(path, tmp_path / "b.onnx", load_plan=tmp_path / "plan.json", evaluate=False)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert first.summary.value_balanced == 2
    assert "balanced: 2 attention outputs, through the value columns" in format_summary(first.summary, 1.0, "a.onnx")
    plain = QuantConfig(calib_size=8, w_bits=6, a_bits=6, attention_probabilities=True, search=search)
    convert(path, tmp_path / "c.onnx", photo_folder, plain, save_plan=tmp_path / "plain.json", evaluate=False)
    assert json.loads((tmp_path / "plain.json").read_text())["schema_version"] == 6


def test_an_attention_output_read_by_anything_else_is_refused_with_a_reason(tmp_path):
    path = tmp_path / "vit.onnx"
    export_timm("vit_small_patch16_224", path, model_kwargs=dict(img_size=32, depth=1), num_classes=10)
    model = canonicalize(load_model(path)[0])
    layers = discover(model, QuantConfig())
    sites, _ = value_sites(import_graph(model), layers)
    assert len(sites) == 1
    extra = onnx.ModelProto()
    extra.CopyFrom(model)
    extra.graph.output.append(onnx.helper.make_empty_tensor_value_info(sites[0].operand))
    assert value_sites(import_graph(extra), layers)[0] == []
    extra = onnx.ModelProto()
    extra.CopyFrom(model)
    node = next(n for n in extra.graph.node if n.name == sites[0].node)
    extra.graph.output.append(onnx.helper.make_empty_tensor_value_info(node.output[0]))
    found, refused = value_sites(import_graph(extra), layers)
    assert not found and "reaches more than linear layers' inputs" in refused[sites[0].group] if refused else not found


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_a_strength_outside_0_1_is_refused_in_one_line(alpha):
    with pytest.raises(ConfigError, match=r"^balance-values-alpha must be within \[0, 1\], got "):
        QuantConfig(techniques=(BalanceValuesSettings(balance_values=True, balance_values_alpha=alpha),))


def test_a_value_layer_without_bias_is_balanced_after_the_layernorm_reparameterization(tmp_path, photo_folder):
    """timm's ViT with ``qkv_bias=False``: the LayerNorm reparameterization gives qkv a bias ``Add``, which writes the
    tensor the MatMul wrote, so the value columns keep the name they were calibrated under and the quantized ``V``
    operands take their range from them; every block is balanced."""
    path = tmp_path / "vit.onnx"
    export_timm("vit_small_patch16_224", path, model_kwargs=dict(img_size=32, depth=2, qkv_bias=False),
                num_classes=10)
    config = QuantConfig(calib_size=8, w_bits=6, a_bits=6, attention_probabilities=True, reparam=True,
                         techniques=(ON,), search=SearchConfig(search_images=4, holdout_images=2, tokens=64,
                                                               shift_min_rows=16))
    result = convert(path, tmp_path / "a.onnx", photo_folder, config, evaluate=False)
    assert result.summary.value_balanced == 2 and result.summary.reparam_groups > 0
    original = canonicalize(load_model(path)[0])
    before = value_sites(import_graph(original), discover(original, config))[0]
    after = value_sites(import_graph(result.float_model), result.layers)[0]
    assert [s.v_tensor for s in before] == [s.v_tensor for s in after] and len(after) == 2
    assert not [s for s in result.summary.skipped if "value columns" in s.reason]
