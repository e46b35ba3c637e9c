"""PTQ-ViT's similarity objective (Pearson) and ranking loss, against direct float64 computations."""

from __future__ import annotations

import numpy as np
import pytest

from nq_onnx.core.config import Objective, SearchConfig
from nq_onnx.core.errors import ConfigError
from nq_onnx.search.objectives import LayerError, ranking_loss, ranking_pairs
from nq_onnx.search.matmul import search_act_matmul
from nq_onnx.core.quantizers import ActQuantizer, WeightQuantizer
from nq_onnx.search.groups import (
    GroupSample,
    GroupSearch,
    LinearOperand,
    search_linear_group,
)


def pearson(a: np.ndarray, b: np.ndarray, axis=None) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    a = a - a.mean(axis=axis, keepdims=axis is not None)
    b = b - b.mean(axis=axis, keepdims=axis is not None)
    return np.sum(a * b, axis=axis) / np.sqrt(np.sum(a * a, axis=axis) * np.sum(b * b, axis=axis))


@pytest.mark.parametrize("k,n", [(24, 8), (16, 40)])
def test_layer_error_pearson_equals_the_direct_correlation(k, n):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((300, k)) + 0.7).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    b = (3 + rng.standard_normal(n)).astype(np.float32)  # an offset: Pearson and cosine differ
    op = LinearOperand("l", w, b, WeightQuantizer(4))
    w_q = op.quantized_weight(op.minmax_scales())
    error = LayerError.build(x, op, w_q, x @ w + b)
    act = ActQuantizer(4, True)
    x_q = act.fake_quant(x, act.minmax_scale(float(np.abs(x).max())))
    out = x_q.astype(np.float64) @ w_q + b
    direct = pearson(out, x.astype(np.float64) @ w + b)
    got = error.similarity(x_q - x, Objective.PEARSON)
    assert 1 - got == pytest.approx(1 - direct, rel=1e-4)
    assert abs(got - error.cosine(x_q - x)) > 1e-4  # a different objective, not the cosine renamed


def test_pearson_search_never_loses_to_minmax_on_its_own_objective():
    """Heavy-tailed inputs at W4A4: the searched steps' layer-output correlation, computed directly in float64,
    is at least MinMax's on the rows it fitted (MinMax is on both grids), and higher here."""
    rng = np.random.default_rng(2)
    x = (rng.standard_t(3, (512, 64)) + 0.3).astype(np.float32)
    ops = tuple(LinearOperand(f"l{i}", rng.standard_normal((64, 32)).astype(np.float32),
                              rng.standard_normal(32).astype(np.float32), WeightQuantizer(4)) for i in range(2))
    act = ActQuantizer(4, True)
    sample = GroupSample(x, float(np.abs(x).max()), x.min(axis=0), x.max(axis=0))
    result = search_linear_group(GroupSearch(sample, ops, act, SearchConfig(objective="pearson")))

    def score(step, scales):
        x_q = act.fake_quant(x, step)
        return np.mean([pearson(x_q.astype(np.float64) @ op.quantized_weight(scales[op.name]) + op.bias,
                                x.astype(np.float64) @ op.weight + op.bias) for op in ops])

    minmax = score(act.minmax_scale(sample.absmax), {op.name: op.minmax_scales() for op in ops})
    assert score(result.scale, result.weight_scales) > minmax


def test_ranking_loss_is_zero_when_order_is_kept_and_positive_when_a_pair_swaps():
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((4, 16, 16))
    pairs = ranking_pairs(scores, 32, np.random.default_rng(0))
    assert ranking_loss(scores, pairs, 0.0) == 0.0
    assert ranking_loss(np.tanh(scores) * 3 + 1, pairs, 0.0) == 0.0  # strictly increasing: same order
    gaps = np.abs(np.diff(np.sort(scores.reshape(-1, 16), axis=1), axis=1))
    stretched = scores * (0.2 / gaps[gaps > 0].min() + 1)  # every gap at least the margin
    assert ranking_loss(stretched, pairs, 0.2) == 0.0
    swapped = scores.copy()
    row, i, j, _ = (p[0] for p in pairs)
    swapped.reshape(-1, 16)[row, [i, j]] = swapped.reshape(-1, 16)[row, [j, i]]
    assert ranking_loss(swapped, pairs, 0.0) > 0.0
    coarse = np.round(scores)  # merges close scores: they no longer differ by the margin
    assert ranking_loss(coarse, pairs, 0.2) > ranking_loss(scores, pairs, 0.2) > 0.0


def test_a_dominant_ranking_loss_picks_the_candidate_that_keeps_the_order_best():
    """With a huge gamma the score is the ranking loss: the last-searched operand's step minimizes it over
    the grid given the other operand's final step."""
    rng = np.random.default_rng(4)
    q, k = (rng.standard_normal((2, 24, 16)).astype(np.float32) for _ in range(2))
    a, b = q, np.ascontiguousarray(np.swapaxes(k, 1, 2))
    config = SearchConfig(ranking_loss=1e6, ranking_margin=0.1, act_alphas=(0.3, 1.0, 15))
    quantizers = (ActQuantizer(4, True), ActQuantizer(4, True))
    absmax = (float(np.abs(a).max()), float(np.abs(b).max()))
    s_a, s_b, _ = search_act_matmul(a, b, absmax, quantizers, config, ranking=True)
    target = a @ b
    pairs = ranking_pairs(target, config.ranking_pairs, np.random.default_rng(0))
    a_q = quantizers[0].fake_quant(a, s_a)
    base_b = quantizers[1].minmax_scale(absmax[1])
    losses = [ranking_loss(a_q @ quantizers[1].fake_quant(b, base_b * t), pairs, 0.1)
              for t in np.linspace(0.3, 1.0, 15)]
    assert ranking_loss(a_q @ quantizers[1].fake_quant(b, s_b), pairs, 0.1) == pytest.approx(min(losses))


def test_bad_objective_settings_are_config_errors():
    with pytest.raises(ConfigError, match="unknown objective 'spearman'"):
        SearchConfig(objective="spearman")
    with pytest.raises(ConfigError, match="ranking_loss"):
        SearchConfig(ranking_loss=-1)


def test_ptq_vit_objectives_convert_a_vit_end_to_end(tmp_path, photo_folder):
    """A 2-block ViT at W6A6 with the Pearson objective and the ranking loss: other steps than EasyQuant's cosine
    search (so the options reach the searches), logits within the W6A6 floor of the end-to-end tests, and the
    plan records both options and reproduces the bytes."""
    import json

    import onnxruntime as ort

    import nq_onnx
    from nq_onnx import QuantConfig
    from nq_onnx.core import quant
    from nq_onnx.calibration.data import load_dataset
    from nq_onnx.export import export_timm
    from nq_onnx.io.model_io import load_model

    path = tmp_path / "vit.onnx"
    export_timm("vit_small_patch16_224", path, model_kwargs=dict(img_size=64, depth=2), num_classes=10)
    feeds = next(load_dataset(photo_folder, load_model(path)[0], limit=16, seed=1).batches(16))
    reference = ort.InferenceSession(str(path)).run(None, feeds)[0]
    results = {}
    for name, search in (("cosine", SearchConfig()), ("ptqvit", SearchConfig(objective="pearson", ranking_loss=0.1))):
        config = QuantConfig(method="easyquant", w_bits=6, a_bits=6, calib_size=12, search=search)
        results[name] = nq_onnx.convert(path, tmp_path / f"{name}.onnx", photo_folder, config,
                                        save_plan=tmp_path / f"{name}.json", evaluate=False)
    steps = {n: {g: p.scale for g, p in r.plan.groups.items()} for n, r in results.items()}
    assert steps["cosine"] != steps["ptqvit"]
    logits = ort.InferenceSession(str(tmp_path / "ptqvit.onnx")).run(None, feeds)[0]
    assert quant.sqnr_db(reference, logits) > 13.0
    saved = json.loads((tmp_path / "ptqvit.json").read_text())["config"]["search"]
    assert (saved["objective"], saved["ranking_loss"]) == ("pearson", 0.1)
    nq_onnx.convert(path, tmp_path / "again.onnx", load_plan=tmp_path / "ptqvit.json")
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "ptqvit.onnx").read_bytes()


def test_row_terms_equal_whole_array_float64_sums_across_row_blocks():
    """:func:`row_terms` computes a layer error's per-row sums :data:`ROW_BLOCK` rows at a time; every value equals
    the float64 ``einsum`` / ``sum`` of the whole arrays bit for bit (row counts below, at and across block
    boundaries)."""
    from nq_onnx.search.objectives import ROW_BLOCK, row_terms

    rng = np.random.default_rng(4)
    for rows in (1, ROW_BLOCK - 1, ROW_BLOCK, 3 * ROW_BLOCK + 7):
        c = (rng.standard_normal((rows, 300)) * 1e-3).astype(np.float32)
        t = rng.standard_normal((rows, 300)).astype(np.float32)
        c64, t64 = c.astype(np.float64), t.astype(np.float64)
        expected = np.stack([np.einsum("tn,tn->t", c64, c64), np.einsum("tn,tn->t", c64, t64),
                             np.einsum("tn,tn->t", t64, t64), c.sum(axis=1, dtype=np.float64),
                             t.sum(axis=1, dtype=np.float64)])
        np.testing.assert_array_equal(row_terms(c, t), expected)
