"""Mixed precision (PTQ-ViT): nuclear-norm sensitivities and the bit assignment under an average-bit budget."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest

from nq_onnx import QuantConfig
from nq_onnx.core.errors import ConfigError
from nq_onnx.search.mixed import (BIT_CHOICES, RESOLUTION, Module, assign_bits, average_bits, linear_sensitivity,
                           matmul_sensitivity, nuclear_norm)
from nq_onnx.core.quantizers import ActQuantizer, WeightQuantizer
from nq_onnx.search.groups import LinearOperand


def test_nuclear_norm_is_the_sum_of_singular_values_of_each_matrix():
    rng = np.random.default_rng(0)
    y = rng.standard_normal((3, 7, 5))
    direct = sum(np.sum(np.sqrt(np.maximum(np.linalg.eigvalsh(m.T @ m), 0))) for m in y)  # sqrt(eig(Y^T Y))
    assert nuclear_norm(y) == pytest.approx(direct, rel=1e-10)
    rank_one = np.outer([1.0, 2.0, 2.0], [3.0, 4.0])  # one singular value: |u| |v| = 3 * 5
    assert nuclear_norm(rank_one) == pytest.approx(15.0, rel=1e-12)


def test_linear_sensitivity_is_nuclear_norm_times_output_error_and_falls_with_bits():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    op = LinearOperand("l", w, b, WeightQuantizer(8))
    absmax = float(np.abs(x).max())
    omega = linear_sensitivity(x, (op,), absmax, True)
    y = x.astype(np.float64) @ w + b
    for bits in BIT_CHOICES:  # the definition, term by term
        act, wq = ActQuantizer(bits, True), WeightQuantizer(bits)
        y_q = act.fake_quant(x, act.minmax_scale(absmax)) @ wq.fake_quant(w, wq.minmax_scales(w)) + b
        expected = np.sum(np.linalg.svd(y, compute_uv=False)) * np.sum((y_q - y) ** 2)
        assert omega[bits] == pytest.approx(expected, rel=1e-4)
    assert [omega[b] for b in BIT_CHOICES] == sorted((omega[b] for b in BIT_CHOICES), reverse=True)


def test_matmul_sensitivity_quantizes_only_the_named_operand():
    rng = np.random.default_rng(2)
    a = rng.random((2, 5, 6)).astype(np.float32)
    b = rng.standard_normal((2, 6, 4)).astype(np.float32)
    omega_a = matmul_sensitivity(a, b, 0, float(a.max()), False, (4,))
    act = ActQuantizer(4, False)
    y = a.astype(np.float64) @ b
    expected = nuclear_norm(y) * np.sum((act.fake_quant(a, act.minmax_scale(float(a.max()))) @ b - y) ** 2)
    assert omega_a[4] == pytest.approx(expected, rel=1e-4)


def modules(seed: int, count: int = 7) -> list[Module]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        scale = rng.lognormal(0, 2)
        out.append(Module(f"g{i}", int(rng.integers(100, 5000)), {b: scale * 4.0 ** (8 - b) for b in BIT_CHOICES}))
    return out


@pytest.mark.parametrize("budget", [4.0, 4.5, 5.0, 6.0, 7.3, 8.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_assignment_respects_the_budget_and_no_step_up_fits(budget, seed):
    mods = modules(seed)
    bits = assign_bits(mods, budget)
    assert set(bits.values()) <= set(BIT_CHOICES)
    total = sum(m.cost for m in mods)
    assert average_bits(mods, bits) <= budget + 1e-12
    for m in mods:  # maximal: any single step up would break the budget
        if bits[m.name] != 8:
            up = BIT_CHOICES[BIT_CHOICES.index(bits[m.name]) + 1]
            assert average_bits(mods, bits) + m.cost * (up - bits[m.name]) / total > budget
    assert assign_bits(list(reversed(mods)), budget) == bits  # deterministic, independent of order


@pytest.mark.parametrize("budget", [4.5, 5.0, 6.0, 7.0])
@pytest.mark.parametrize("seed", range(8))
def test_assignment_is_the_exhaustive_optimum(seed, budget):
    """Against all 4^5 assignments of 5 modules: no assignment that fits the budget with the knapsack's rounding
    slack to spare (``2 len(modules)`` cost units) has a lower total sensitivity, and uniform precision at or below
    the budget is never better."""
    mods = modules(seed, 5)
    bits = assign_bits(mods, budget)
    total_cost = sum(m.cost for m in mods)
    slack = 2 * len(mods) * total_cost / RESOLUTION
    cost = lambda a: sum(m.sensitivity[a[m.name]] for m in mods)  # noqa: E731
    names = [m.name for m in mods]
    every = [dict(zip(names, combo)) for combo in itertools.product(BIT_CHOICES, repeat=5)]
    strict = [a for a in every if sum(m.cost * a[m.name] for m in mods) <= budget * total_cost - slack]
    assert cost(bits) <= min(cost(a) for a in strict) * (1 + 1e-12)
    uniform = max(b for b in BIT_CHOICES if b <= budget)
    assert cost(bits) <= cost(dict.fromkeys(names, uniform))


def test_budget_settings_are_checked():
    with pytest.raises(ConfigError, match="between 4 and 8"):
        QuantConfig(bits_budget=3.5)
    with pytest.raises(ConfigError, match="leave w-bits and a-bits at 8"):
        QuantConfig(bits_budget=6.0, w_bits=6)
    with pytest.raises(ConfigError, match="not minmax"):
        QuantConfig(bits_budget=6.0, method="minmax")


@pytest.mark.parametrize("method,sensitivity,images",
                         [("noisyquant", "output", 1), ("noisyquant-ptq4vit", "nuclear", 1), ("easyquant", "joint", 2),
                          ("noisyquant", "searched", 1)])
def test_budget_conversion_mixes_widths_within_budget_on_integer_kernels(method, sensitivity, images, tmp_path,
                                                                         photo_folder):
    """A 2-block ViT under a 6.0-bit budget: groups take more than one width, the plan's cost-weighted average is
    at most 6.0 and the summary says it, every layer's stored weight codes have exactly its planned width, every
    matmul runs as an integer kernel, and re-applying the saved plan gives the same model bytes."""
    import onnx

    from nq_onnx import SearchConfig, convert
    from nq_onnx.export import export_timm
    from nq_onnx.inspect import inspect_model
    from nq_onnx.core.plan import Plan, average_bits as plan_average

    path = tmp_path / "vit.onnx"
    export_timm("vit_small_patch16_224", path, model_kwargs=dict(img_size=64, depth=2), num_classes=10)
    symmetric = {"activations": "symmetric"} if sensitivity == "searched" else {}  # searched: uniform symmetric only
    config = QuantConfig(method=method, bits_budget=6.0, mixed_sensitivity=sensitivity, mixed_images=images,
                         calib_size=12, search=SearchConfig(tokens=256), **symmetric)
    result = convert(path, tmp_path / "q.onnx", photo_folder, config, evaluate=False, save_plan=tmp_path / "p.json")
    plan = result.plan
    widths = {g.bits for g in plan.groups.values()}
    assert len(widths) > 1 and widths <= set(BIT_CHOICES)
    assert all(g.precision is not None for g in plan.groups.values())
    assert plan_average(plan.groups) <= 6.0 + 1e-9
    assert result.summary.average_bits == pytest.approx(plan_average(plan.groups))
    inspection = inspect_model(onnx.load(str(tmp_path / "q.onnx")))
    assert not inspection.failures, [k.layer for k in inspection.failures]
    planned = {name: lp.bits for name, lp in plan.layers.items() if lp.weight_scales is not None}
    read = {}  # a twin-uniform layer is two matmuls (``<layer>/twin_...``) on the same weight codes
    for k in inspection.weight_layers:
        read.setdefault(k.layer.split("/twin_")[0], set()).add(k.weight_bits)
    assert {name: read.get(name) for name in planned} == {name: {bits} for name, bits in planned.items()}
    for name, lp in plan.layers.items():  # a layer's weights take its input group's width
        spec = result.layers.layer(name)
        if lp.weight_scales is not None:
            assert lp.bits == plan.groups[result.layers.group_of(spec.inputs[0]).name].bits
    again = convert(path, tmp_path / "again.onnx", None, load_plan=tmp_path / "p.json", evaluate=False)
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "q.onnx").read_bytes()
    assert Plan.load(tmp_path / "p.json").groups.keys() == again.plan.groups.keys()


def _mlp_case(seed: int) -> SimpleNamespace:
    """x -> fc1 -> Relu -> fc2 (``conftest.mlp_model``) with its layers, float weights (float64 copies ``w1, b1,
    w2, b2``), an input ``x``, the float ``hidden`` and output ``y``, and its two groups' names."""
    import onnx_graphsurgeon as gs
    from conftest import mlp_model

    from nq_onnx.passes.find_layers import find_layers
    from nq_onnx.search.planner import float_weights

    rng = np.random.default_rng(seed)
    model = mlp_model(rng)
    graph = gs.import_onnx(model)
    layers = find_layers(graph)
    consts = {n: t.values for n, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    x = rng.standard_normal((2, 5, 12)).astype(np.float32)
    w1, b1, w2, b2 = (consts[n].astype(np.float64) for n in ("fc1.w", "fc1.b", "fc2.w", "fc2.b"))
    hidden = np.maximum(x @ w1 + b1, 0)
    return SimpleNamespace(model=model, layers=layers, weights=float_weights(graph, layers), x=x, w1=w1, b1=b1,
                           w2=w2, b2=b2, hidden=hidden, y=hidden @ w2 + b2, g_in=layers.group_of("x").name,
                           g_hidden=layers.group_of("h2").name)


def _minmax_weight(w: np.ndarray, bits: int) -> np.ndarray:
    """``w`` fake-quantized per channel at its MinMax steps, in float64."""
    q = WeightQuantizer(bits)
    return q.fake_quant(w.astype(np.float32), q.minmax_scales(w.astype(np.float32))).astype(np.float64)


def test_output_sensitivity_is_the_model_output_error_with_one_group_quantized():
    """``output_sensitivities`` on x -> fc1 -> Relu -> fc2: each group's value at each width equals the model
    output's MSE computed in numpy with that group alone MinMax-quantized (its input and its layer's weights)."""
    from nq_onnx.calibration.simulate import output_sensitivities

    m = _mlp_case(7)
    g_in, g_hidden = m.g_in, m.g_hidden
    absmax = {g_in: float(np.abs(m.x).max()), g_hidden: float(m.hidden.max())}
    # the input at a clipped step (0.8 x MinMax), the hidden group at MinMax's
    steps = {g_in: {b: 0.8 * ActQuantizer(b, True).minmax_scale(absmax[g_in]) for b in BIT_CHOICES},
             g_hidden: {b: ActQuantizer(b, False).minmax_scale(absmax[g_hidden]) for b in BIT_CHOICES}}
    got = output_sensitivities(m.model, m.layers, m.weights, {"x": m.x}, frozenset({g_hidden}), steps, BIT_CHOICES)

    for bits in BIT_CHOICES:
        signed, unsigned = ActQuantizer(bits, True), ActQuantizer(bits, False)
        x_q = signed.fake_quant(m.x, np.float32(0.8 * signed.minmax_scale(absmax[g_in])))
        first = np.maximum(x_q @ _minmax_weight(m.w1, bits) + m.b1, 0) @ m.w2 + m.b2
        h_q = unsigned.fake_quant(m.hidden.astype(np.float32), unsigned.minmax_scale(absmax[g_hidden]))
        second = h_q @ _minmax_weight(m.w2, bits) + m.b2
        assert got[g_in][bits] == pytest.approx(np.mean((first - m.y) ** 2), rel=1e-3)
        assert got[g_hidden][bits] == pytest.approx(np.mean((second - m.y) ** 2), rel=1e-3)
    assert got[g_in][4] > got[g_in][8] and got[g_hidden][4] > got[g_hidden][8]


def test_operating_point_sensitivity_is_the_change_from_the_uniform_model():
    """With ``base = 6``, each group's value at width ``b`` is the model output's MSE (numpy) with that group at
    ``b`` bits and the other at 6, minus the MSE with both at 6: 0 at 6, below 0 at 8, above 0 at 4."""
    from nq_onnx.calibration.simulate import output_sensitivities

    m = _mlp_case(11)
    g_in, g_hidden = m.g_in, m.g_hidden
    steps = {g_in: {b: 0.9 * ActQuantizer(b, True).minmax_scale(float(np.abs(m.x).max())) for b in BIT_CHOICES},
             g_hidden: {b: ActQuantizer(b, False).minmax_scale(float(m.hidden.max())) for b in BIT_CHOICES}}

    def sensitivities(base):
        return output_sensitivities(m.model, m.layers, m.weights, {"x": m.x}, frozenset({g_hidden}), steps,
                                    BIT_CHOICES, base=base)

    got = sensitivities(6)

    def output_mse(b_in, b_hidden):
        x_q = ActQuantizer(b_in, True).fake_quant(m.x, np.float32(steps[g_in][b_in]))
        h = np.maximum(x_q @ _minmax_weight(m.w1, b_in) + m.b1, 0).astype(np.float32)
        h_q = ActQuantizer(b_hidden, False).fake_quant(h, np.float32(steps[g_hidden][b_hidden]))
        return np.mean((h_q @ _minmax_weight(m.w2, b_hidden) + m.b2 - m.y) ** 2)

    floor = output_mse(6, 6)
    for bits in BIT_CHOICES:
        assert got[g_in][bits] == pytest.approx(output_mse(bits, 6) - floor, rel=2e-3, abs=1e-9 * floor)
        assert got[g_hidden][bits] == pytest.approx(output_mse(6, bits) - floor, rel=2e-3, abs=1e-9 * floor)
    assert got[g_in][6] == got[g_hidden][6] == 0.0
    assert got[g_in][8] < 0 < got[g_in][4] and got[g_hidden][8] < 0 < got[g_hidden][4]
    with pytest.raises(ValueError, match="width 7"):
        sensitivities(7)


def test_searched_sensitivity_feeds_each_width_search_choices_into_one_group():
    """``searched_sensitivities`` on x -> fc1 -> Relu -> fc2 with a made-up "search result" per width (a step, a
    noise vector on the input group, fake-quantized weights and the denoising delta ``-N dq(W)``): each group's
    value at ``b`` equals numpy's output MSE with that group taking width ``b``'s choices and the other width 6's,
    minus the MSE with both at 6."""
    from nq_onnx.calibration.simulate import WidthSimulation, searched_feeds, searched_sensitivities

    m = _mlp_case(13)
    rng = np.random.default_rng(5)
    (fc1,), (fc2,) = (m.layers.group(g).consumers for g in (m.g_in, m.g_hidden))
    step_in = {b: 0.9 * ActQuantizer(b, True).minmax_scale(float(np.abs(m.x).max())) for b in BIT_CHOICES}
    step_h = {b: 0.95 * ActQuantizer(b, False).minmax_scale(float(m.hidden.max())) for b in BIT_CHOICES}
    noise = {b: rng.uniform(-step_in[b] / 2, step_in[b] / 2, 12).astype(np.float32) for b in BIT_CHOICES}
    w1 = {b: _minmax_weight(m.w1, b).astype(np.float32) for b in BIT_CHOICES}
    w2 = {b: _minmax_weight(m.w2, b).astype(np.float32) for b in BIT_CHOICES}
    delta = {b: -(noise[b] @ w1[b]) for b in BIT_CHOICES}
    searched = {b: {f"sim/{m.g_in}/scale": np.array(step_in[b], np.float32), f"sim/{m.g_in}/on": np.array(True),
                    f"sim/{m.g_in}/noise": noise[b], f"sim/{fc1}/weight": w1[b], f"sim/{fc1}/delta": delta[b],
                    f"sim/{m.g_hidden}/scale": np.array(step_h[b], np.float32),
                    f"sim/{m.g_hidden}/on": np.array(True), f"sim/{m.g_hidden}/noise": np.zeros(20, np.float32),
                    f"sim/{fc2}/weight": w2[b], f"sim/{fc2}/delta": np.zeros(7, np.float32)}
                for b in BIT_CHOICES}
    got = searched_sensitivities(m.model, m.layers, m.weights, {"x": m.x}, frozenset({m.g_hidden}), searched, 6)

    def output_mse(b_in, b_hidden):
        x_q = ActQuantizer(b_in, True).fake_quant(m.x + noise[b_in], np.float32(step_in[b_in]))
        h = np.maximum(x_q @ w1[b_in] + m.b1 + delta[b_in], 0).astype(np.float32)
        h_q = ActQuantizer(b_hidden, False).fake_quant(h, np.float32(step_h[b_hidden]))
        return np.mean((h_q @ w2[b_hidden].astype(np.float64) + m.b2 - m.y) ** 2)

    floor = output_mse(6, 6)
    for bits in BIT_CHOICES:
        assert got[m.g_in][bits] == pytest.approx(output_mse(bits, 6) - floor, rel=2e-3, abs=1e-9 * floor)
        assert got[m.g_hidden][bits] == pytest.approx(output_mse(6, bits) - floor, rel=2e-3, abs=1e-9 * floor)
    assert got[m.g_in][8] < 0 < got[m.g_in][4]
    sim = WidthSimulation(m.model, m.layers, m.weights, {"x": m.x}, frozenset({m.g_hidden}), 8,
                          searched_feeds(m.layers, searched))  # any width per group, as mixed_additivity.py uses it
    for b_in, b_hidden in ((8, 4), (5, 6), (4, 8)):
        mixed = sim.mse(sim.feeds({m.g_in: b_in, m.g_hidden: b_hidden}))
        assert mixed == pytest.approx(output_mse(b_in, b_hidden), rel=2e-3)
    with pytest.raises(ValueError, match="width 7"):
        searched_sensitivities(m.model, m.layers, m.weights, {"x": m.x}, frozenset({m.g_hidden}), searched, 7)


def test_searched_sensitivity_refuses_twin_uniform_quantizers():
    with pytest.raises(ConfigError, match="searched needs uniform activation quantizers"):
        QuantConfig(method="noisyquant-ptq4vit", bits_budget=6.0, mixed_sensitivity="searched")


def test_mixed_images_is_recorded_where_it_decides_something():
    """Sensitivities are on 4 fit images by default; a config without a bits budget, where the setting decides
    nothing, records it as every plan did before that default (1), so such plans and models keep their bytes, and
    a budget config records and reloads its own value."""
    assert QuantConfig().mixed_images == 4 and QuantConfig(bits_budget=6.0).to_dict()["mixed_images"] == 4
    for config in (QuantConfig(), QuantConfig(mixed_images=7)):
        assert config.to_dict()["mixed_images"] == 1
        assert QuantConfig.from_dict(config.to_dict()) == QuantConfig()
    budget = QuantConfig(bits_budget=6.0, mixed_images=3)
    assert QuantConfig.from_dict(budget.to_dict()) == budget


def test_budget_report_shows_the_assignments_pareto_front(tmp_path, photo_folder):
    """A bits-budget conversion's report plots the knapsack's front: at the plan's own budget the front's point is
    the plan's assignment (same average bits and summed sensitivity), which is never above the uniform width that
    fits the budget; the front's averages stay within their budgets, and the page shows the section."""
    import json

    from nq_onnx import SearchConfig, convert
    from nq_onnx.export import export_timm

    path = tmp_path / "vit.onnx"
    export_timm("vit_small_patch16_224", path, model_kwargs=dict(img_size=64, depth=2), num_classes=10)
    config = QuantConfig(method="easyquant", bits_budget=6.0, calib_size=12, search=SearchConfig(tokens=256))
    convert(path, tmp_path / "q.onnx", photo_folder, config, evaluate=False, report=tmp_path / "r.html",
            report_dir=tmp_path / "r")
    precision = json.loads((tmp_path / "r" / "report.json").read_text())["precision"]
    at_budget = next(p for p in precision["front"] if p["budget"] == 6.0)
    chosen = precision["chosen"]
    assert chosen["average_bits"] == pytest.approx(at_budget["average_bits"], rel=1e-12)
    assert chosen["sensitivity"] == pytest.approx(at_budget["sensitivity"], rel=1e-12)
    assert chosen["groups"] == at_budget["groups"]
    uniform6 = next(p for p in precision["uniform"] if p["average_bits"] == 6.0)
    assert chosen["sensitivity"] <= uniform6["sensitivity"] * (1 + 1e-12)
    assert all(p["average_bits"] <= p["budget"] + 1e-9 for p in precision["front"])
    assert "the bit budget's trade-off" in (tmp_path / "r.html").read_text()
    assert (tmp_path / "r" / "pareto.png").stat().st_size > 0
