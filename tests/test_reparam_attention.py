"""Attention reparameterization: K centred and Q/K channels balanced, folded into the layers that make Q and K.

``softmax(Q K^T) = softmax(Q (K - 1 c^T)^T)`` and ``Q K^T = (Q diag(s)) (K diag(1 / s))^T``: the rewritten float model
computes the original one (float rounding only), on timm's ViT (fused qkv, opset 17 and 13), DeiT, Swin (window
attention; its shifted-window blocks reshape the scores around the mask and are refused, with the reason) and the
demo's ViT-S/14 (separate query and key layers, both scaled by ``d^-1/4``). What it buys is measured on held-out
real activations: the 6-bit error of the scores as the Softmax sees them (each row's mean error removed).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import run
from test_reparam import MODELS, exported

from nq_onnx import QuantConfig, SearchConfig, convert
from nq_onnx.techniques import reparam_attention as reparam
from nq_onnx.calibration.collect import collect_stats, float_values
from nq_onnx.calibration.data import Dataset, Preprocess
from nq_onnx.demo import EVAL_PHOTOS, crops, demo_model_path, demo_photos
from nq_onnx.export import export_timm
from nq_onnx.inspect import inspect_model
from nq_onnx.io.model_io import load_model
from nq_onnx.passes import SkipKind, import_graph
from nq_onnx.passes.reparam_attention import attention_sites
from nq_onnx.pipeline import canonicalize, discover
from nq_onnx.core.plan import Plan
from nq_onnx.core.quantizers import ActQuantizer


def rewrite(model: onnx.ModelProto, data: Dataset):
    """The model with every site's factors folded in, the sites, refusals, calibration statistics and factors."""
    layers = discover(model, QuantConfig())
    sites, refused = attention_sites(import_graph(model), layers)
    operands = [t for s in sites for t in layers.layer(s.layer).inputs]
    columns = sorted({t for s in sites for t in (s.q_tensor, s.k_tensor)})
    stats = collect_stats(model, operands + columns, data, 8)
    factors = {s.layer: reparam.attention_factors(s, stats) for s in sites}
    out, result = reparam.reparameterize_attention(model, layers, factors)
    assert result.applied == [s.layer for s in sites] and not result.skipped
    return out, layers, sites, refused, stats, factors


@pytest.fixture(scope="module", params=sorted(MODELS))
def family(request, tmp_path_factory, photo_folder):
    # swin: a second block per stage, shifted windows, whose mask is added to the scores
    more = dict(depths=(2, 1, 1, 1)) if request.param == "swin" else {}
    model, data = exported(request.param, tmp_path_factory.mktemp(request.param), photo_folder, **more)
    return (request.param, model, data) + rewrite(model, data)


def test_the_rewritten_model_computes_the_original_on_real_images(family):
    name, model, data, out, layers, sites, refused, *_ = family
    feeds = {k: v for batch in data.batches(16) for k, v in batch.items()}
    want, got = run(model, feeds)[0], run(out, feeds)[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    scores = [s.name for s in layers.layers if s.kind == "act_matmul" and not s.name.endswith("MatMul_1")]
    assert {s.layer for s in sites} | {s.layer for s in refused} == set(scores)
    if name == "swin":
        assert [s.layer for s in refused] == ["layers.0.blocks.1.attn.MatMul"]
        assert "may move the key axis" in refused[0].reason and refused[0].kind == SkipKind.ATTENTION_KEPT
    else:
        assert not refused and len(sites) == 2


def test_k_is_centred_and_each_q_k_pair_shares_one_range(family):
    """On the calibration images, each rewritten K channel is centred on zero and reaches as far as its Q partner
    (``sqrt(a h)`` both, in the units of the layer's output), where before the pairs' ranges differed; the
    per-tensor operand ranges the search starts from are the ones the rewritten model has."""
    _, _, data, out, layers, sites, _, stats, factors = family
    operands = [t for s in sites for t in layers.layer(s.layer).inputs]
    after = collect_stats(out, sorted({t for s in sites for t in (s.q_tensor, s.k_tensor)}) + operands, data, 8)
    for site in sites:
        q, k = after[site.q_tensor], after[site.k_tensor]
        q_reach = np.maximum(-q.channel_min[site.q_columns], q.channel_max[site.q_columns])
        k_low, k_high = k.channel_min[site.k_columns], k.channel_max[site.k_columns]
        scale = float(np.abs(k_high - k_low).max())
        np.testing.assert_allclose((k_low + k_high) / 2, 0, atol=1e-5 * scale)
        np.testing.assert_allclose(q_reach, (k_high - k_low) / 2, rtol=1e-4, atol=1e-6 * scale)
        before_q = stats[site.q_tensor]
        before = np.maximum(-before_q.channel_min[site.q_columns], before_q.channel_max[site.q_columns])
        assert np.std(np.log(before)) > 0.05  # the pairs did differ before
        predicted = reparam.attention_operand_stats(site, factors[site.layer], stats)
        for tensor, want in zip(layers.layer(site.layer).inputs, predicted):
            got = after[tensor]
            np.testing.assert_allclose([got.channel_min.min(), got.channel_max.max()],
                                       [want.channel_min[0], want.channel_max[0]], rtol=1e-4)


@pytest.mark.parametrize("reader", ["scores", "columns"])
def test_a_site_read_by_anything_else_is_refused_with_a_reason(tmp_path, reader):
    """Scores that are also a graph output, or Q/K columns that are, cannot be rewritten: refused, nothing changed."""
    path = tmp_path / "vit.onnx"
    export_timm("vit_small_patch16_224", path, model_kwargs=dict(img_size=32, depth=1), num_classes=10)
    model = canonicalize(load_model(path)[0])
    layers = discover(model, QuantConfig())
    graph = import_graph(model)
    sites, _ = attention_sites(graph, layers)
    assert len(sites) == 1
    tensor = sites[0].q_tensor if reader == "columns" else next(
        n.outputs[0] for n in graph.nodes if n.name == layers.layer(sites[0].layer).node).name
    extra = onnx.ModelProto()
    extra.CopyFrom(model)
    extra.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    sites, refused = attention_sites(import_graph(extra), layers)
    assert not sites and len(refused) == 1
    assert ("read by more than a Softmax" if reader == "scores" else "also read by a graph output") in refused[0].reason


def test_the_6_bit_error_of_the_scores_falls_on_held_out_real_activations():
    """The demo's ViT-S/14 (real weights): per-tensor 6-bit MinMax quantizers of Q and K from 24 calibration crops,
    the error of ``Q K^T`` on 8 held-out crops with each row's mean removed (a row constant does not reach the
    Softmax's output). Centring and balancing lower it in every block (0.04-0.76x on this machine), by more than half
    on the geometric mean (0.33x)."""
    model = canonicalize(load_model(demo_model_path())[0])
    pre = Preprocess.from_model(model, crop_pct=1.0)
    photos, name = demo_photos(), model.graph.input[0].name
    fit = Dataset((name,), arrays={name: crops(photos[EVAL_PHOTOS:], pre, 0)[:24]})
    held = {name: crops(photos[:EVAL_PHOTOS], pre, 1)[:8]}
    out, layers, sites, refused, stats, factors = rewrite(model, fit)
    assert len(sites) == 12 and not refused
    assert all(s.q_layer != s.k_layer for s in sites)  # separate query and key layers
    operands = [t for s in sites for t in layers.layer(s.layer).inputs]
    before, after = float_values(model, operands, held), float_values(out, operands, held)
    act = ActQuantizer(6, True)

    def error(q, k, q_absmax, k_absmax):
        e = act.fake_quant(q, act.minmax_scale(q_absmax)) @ act.fake_quant(k, act.minmax_scale(k_absmax)) - q @ k
        return float(np.mean((e - e.mean(axis=-1, keepdims=True)) ** 2))

    ratios = []
    for site in sites:
        a, b = layers.layer(site.layer).inputs
        q_stats, k_stats = reparam.attention_operand_stats(site, factors[site.layer], stats)
        ratios.append(error(after[a], after[b], q_stats.absmax, k_stats.absmax)
                      / error(before[a], before[b], stats[a].absmax, stats[b].absmax))
    assert max(ratios) < 0.9, ratios
    assert np.exp(np.mean(np.log(ratios))) < 0.5, ratios


def test_a_saved_plan_reapplies_the_attention_reparameterization_without_calibration(tmp_path, photo_folder):
    """``--reparam-attention`` is recorded in the plan (each scores layer's factors); converting with the saved plan
    and no images gives the same bytes, with LayerNorm reparameterization beside it, and the model stays all-integer
    on onnxruntime's CPU kernels."""
    path = tmp_path / "vit.onnx"
    export_timm("vit_small_patch16_224", path, model_kwargs=dict(img_size=32, depth=2), num_classes=10)
    config = QuantConfig(calib_size=8, reparam=True, reparam_attention=True, w_bits=6, a_bits=6, balance_channels=False,
                         search=SearchConfig(search_images=4, holdout_images=2, tokens=64, shift_min_rows=16))
    first = convert(path, tmp_path / "a.onnx", photo_folder, config, save_plan=tmp_path / "plan.json", evaluate=False)
    assert first.summary.attention_reparams == 2 and first.summary.reparam_groups == 4
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["schema_version"] == 5 and doc["config"]["reparam_attention"] is True
    plan = Plan.load(tmp_path / "plan.json")
    assert [n for n, p in plan.layers.items() if p.attention is not None] == [s.layer for s in attention_sites(
        import_graph(first.float_model), first.layers)[0]]
    second = convert(path, tmp_path / "b.onnx", load_plan=tmp_path / "plan.json", evaluate=False)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert second.summary.attention_reparams == 2
    assert not inspect_model(onnx.load(str(tmp_path / "b.onnx"))).failures


def test_the_cli_says_how_many_scores_matmuls_were_reparameterized(tmp_path, photo_folder, capsys):
    from nq_onnx.cli import main

    path = tmp_path / "vit.onnx"
    export_timm("vit_small_patch16_224", path, model_kwargs=dict(img_size=32, depth=2), num_classes=10)
    assert main(["convert", str(path), "-o", str(tmp_path / "q.onnx"), "--calib", str(photo_folder), "--calib-size",
                 "4", "--reparam-attention", "--no-eval", "-q", "--search-tokens", "64"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("attention:"))
    assert line.strip() == "attention: K centred and Q/K balanced in 2 scores matmuls"


def test_a_plan_without_attention_factors_is_written_as_schema_4(tmp_path):
    """Options added after schema 4 are written only where set, so a plan that does not use them has the bytes the
    version before wrote (the golden digests rely on it) and older versions read it."""
    Plan("0" * 64, QuantConfig(reparam=True)).save(tmp_path / "plan.json")
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["schema_version"] == 4 and "reparam_attention" not in doc["config"]
    assert Plan.load(tmp_path / "plan.json").config == QuantConfig(reparam=True)


@pytest.mark.parametrize("damage", ["short", "missing"])
def test_a_plan_with_broken_attention_factors_is_refused_in_one_line(tmp_path, photo_folder, capsys, damage):
    """Attention factors of the wrong length, or an entry naming no array: one line naming the problem, exit 2,
    no output written, the model and the plan untouched."""
    from test_errors import fails

    path = tmp_path / "vit.onnx"
    export_timm("vit_small_patch16_224", path, model_kwargs=dict(img_size=32, depth=1), num_classes=10)
    config = QuantConfig(calib_size=4, reparam_attention=True, method="minmax")
    convert(path, tmp_path / "a.onnx", photo_folder, config, save_plan=tmp_path / "plan.json", evaluate=False)
    doc = json.loads((tmp_path / "plan.json").read_text())
    entry = next(layer["attention"] for layer in doc["layers"] if layer.get("attention"))
    if damage == "short":
        with np.load(tmp_path / "plan.npz") as npz:
            arrays = {k: npz[k] for k in npz.files}
        arrays[entry["scale"]], arrays[entry["shift"]] = arrays[entry["scale"]][:-1], arrays[entry["shift"]][:-1]
        np.savez(tmp_path / "plan.npz", **arrays)
        needles = ("cannot be reparameterized", "channel pairs")
    else:
        entry["scale"] = "layer/nowhere/attention_scale"
        (tmp_path / "plan.json").write_text(json.dumps(doc))
        needles = ("malformed plan",)
    capsys.readouterr()
    fails(capsys, ["convert", path, "-o", tmp_path / "b.onnx", "--load-plan", tmp_path / "plan.json"], *needles,
          inputs=[path, tmp_path / "plan.json", tmp_path / "plan.npz"])
