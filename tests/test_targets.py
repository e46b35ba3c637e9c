"""Asymmetric activations and deployment targets.

The asymmetric quantizer's numpy arithmetic, its emitted ``QuantizeLinear`` and onnxruntime's integer kernel agree
code for code; on a one-sided tensor it halves the step of a symmetric range. Each target writes what it promises,
checked on the graph by ``inspect``'s target rules (the ``gpu`` rules are TensorRT's Q/DQ placement, checked on the
graph only: no GPU runs here), and refuses an option it cannot run in one line before any work.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import mlp_model, run

from nq_onnx import QuantConfig

from nq_onnx.core import quant
from nq_onnx.calibration.data import Dataset
from nq_onnx.core.errors import ConfigError
from nq_onnx.inspect import inspect_model, target_failures
from nq_onnx.pipeline import quantize
from nq_onnx.core.quantizers import ActQuantizer


def gelu_like(rng: np.random.Generator, shape) -> np.ndarray:
    """GELU of a normal: one-sided, ``>= -0.17``, a long positive tail."""
    z = rng.standard_normal(shape).astype(np.float32) * 2
    return (0.5 * z * (1 + np.tanh(0.7978845608 * (z + 0.044715 * z**3)))).astype(np.float32)


def emitted_codes(quantizer: ActQuantizer, x: np.ndarray, scale: float) -> np.ndarray:
    """The codes ``QuantizeLinear`` (after its Clip below 8 bits) stores for ``x``, minus its zero point."""
    graph = gs.Graph(inputs=[gs.Variable("x", dtype=np.float32, shape=list(x.shape))], opset=17)
    out = quantizer.emit(graph, "g", graph.inputs[0], scale)
    graph.outputs = [out.codes]
    codes = run(gs.export_onnx(graph), {"x": x})[0]
    return codes.astype(np.int64) - int(out.zero_point.values.reshape(-1)[0])


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_asymmetric_codes_equal_the_emitted_quantizer_bit_for_bit(bits):
    rng = np.random.default_rng(bits)
    x = gelu_like(rng, (64, 32))
    x[0, :4] = [-0.17, -0.3, 40.0, 1e-4]  # below the anchor, far above the range: both ends saturate
    q = ActQuantizer(bits, signed=False, low=float(x.min()) / 2)
    for scale in (q.minmax_scale(float(np.abs(x).max())), 0.013, 0.0021):
        lo, hi = q.codes_for(scale)
        assert lo <= 0 <= hi and hi - lo == 2**bits - 1  # z = 0 where |low| < s / 2: it rounds to 0 anyway
        want = q.codes(x, scale)
        np.testing.assert_array_equal(emitted_codes(q, x, scale), want)
        np.testing.assert_array_equal(q.fake_quant(x, scale), want.astype(np.float32) * np.float32(scale))


def test_asymmetric_range_quarters_the_error_of_a_one_sided_tensor():
    """MinMax steps on GELU outputs: the asymmetric range spends every code on ``[min, max]``, the symmetric one
    half of them on ``[-max, min)``: about half the step, a quarter of the squared error."""
    x = gelu_like(np.random.default_rng(0), (4096, 64))
    absmax = float(np.abs(x).max())
    sym = ActQuantizer(8)
    asym = ActQuantizer(8, signed=False, low=float(x.min()))
    mse = [float(np.mean((q.fake_quant(x, q.minmax_scale(absmax)) - x) ** 2)) for q in (sym, asym)]
    assert mse[1] < 0.3 * mse[0], mse


def test_asymmetric_quantizer_refuses_a_non_negative_anchor():
    with pytest.raises(ValueError, match="negative minimum"):
        ActQuantizer(8, signed=False, low=0.0)


def convert_mlp(config: QuantConfig, gelu: bool = True):
    """A two-layer MLP (GELU-like between, via Relu's shape and a negative tail) converted with ``config``."""
    rng = np.random.default_rng(5)
    model = mlp_model(rng)
    if gelu:  # Relu -> x * sigmoid(1.702 x): a GELU-shaped one-sided input for fc2
        graph = gs.import_onnx(model)
        node = next(n for n in graph.nodes if n.op == "Relu")
        sig = gs.Variable("sig", dtype=np.float32)
        scaled = gs.Variable("scaled", dtype=np.float32)
        graph.nodes += [gs.Node("Mul", inputs=[node.inputs[0], gs.Constant("k", np.array(1.702, np.float32))],
                                outputs=[scaled]),
                        gs.Node("Sigmoid", inputs=[scaled], outputs=[sig])]
        node.op, node.inputs = "Mul", [node.inputs[0], sig]
        model = gs.export_onnx(graph.cleanup().toposort())
        model.ir_version = 8
    x = rng.standard_normal((16, 5, 12)).astype(np.float32) * 2
    return model, x, quantize(model, "test", config, Dataset(("x",), arrays={"x": x}))


def test_asymmetric_activations_lower_the_held_out_error_of_a_gelu_mlp():
    """The fc2 input (``>= -0.17``) takes asymmetric codes; on inputs no calibration saw the asymmetric model's
    output error is well below the symmetric one's."""
    errors = {}
    for mode in ("symmetric", "asymmetric"):
        model, _, result = convert_mlp(QuantConfig(method="easyquant", activations=mode, w_bits=8,
                                                   weight_dtype="auto",  # unconstrained codes: activations decide
                                                   weight_rounding="nearest", bias_correction=False))
        held = np.random.default_rng(9).standard_normal((32, 5, 12)).astype(np.float32) * 2
        reference, got = run(model, {"x": held})[0], run(result.model, {"x": held})[0]
        errors[mode] = float(np.mean((got - reference) ** 2))
        lows = {g.name: g.low for g in result.plan.groups.values()}
        assert (lows["mlp.fc2"] is not None) == (mode == "asymmetric") and lows["mlp.fc1"] is None, lows
    assert errors["asymmetric"] < 0.6 * errors["symmetric"], errors


@pytest.mark.parametrize("target", ["portable", "x86-vnni", "gpu"])
def test_each_target_writes_what_it_promises(target):
    activations = "symmetric" if target == "gpu" else "asymmetric"
    _, _, result = convert_mlp(QuantConfig(method="noisyquant", target=target, activations=activations))
    inspection = inspect_model(result.model)
    assert target_failures(inspection, target) == []
    assert inspection.weight_dtypes == {"int8": 2}  # portable: 8-bit codes within the kernel pairs' limit
    assert result.plan.config.w_bits == 8
    if target == "portable":
        assert not inspection.overflow_layers
        assert max(k.pair_sum_bound for k in inspection.weight_layers) <= 255 * 128
        assert target_failures(inspection, "gpu")  # uint8 zero points: not TensorRT's
        _, _, eight = convert_mlp(QuantConfig(method="noisyquant", weight_dtype="auto"))  # full range: uint8 if unsafe
        wide = inspect_model(eight.model)
        assert not wide.overflow_layers and wide.weight_dtypes.get("uint8", 0) >= 1
    if target == "gpu":
        zero_points = [t for t in result.model.graph.initializer if t.name.endswith("zero_point")]
        assert zero_points and all(t.data_type == onnx.TensorProto.INT8 for t in zero_points)
        assert all(not np.any(onnx.numpy_helper.to_array(t)) for t in zero_points)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from nq_onnx.export import export_timm

    path = tmp_path_factory.mktemp("vit") / "vit.onnx"
    export_timm("vit_small_patch16_224", path, model_kwargs=dict(img_size=32, depth=2), num_classes=10)
    return path


def test_a_twin_model_fails_every_target_on_its_float_select(tiny_vit, photo_folder, tmp_path):
    """PTQ4ViT's softmax twin selects each attention probability's range with a float ``Where`` in front of its
    quantizers: no target accepts it; the same model with uniform quantizers passes ``x86-vnni``. (No held-out
    images: the twin is kept without its check against the uniform quantizer, which it loses on this tiny ViT.)"""
    from nq_onnx import SearchConfig, convert

    for method, selects in (("ptq4vit", True), ("easyquant", False)):
        config = QuantConfig(method=method, activations="symmetric", attention_probabilities=True, calib_size=8,
                             target="x86-vnni", search=SearchConfig(holdout_images=0))
        convert(tiny_vit, tmp_path / f"{method}.onnx", photo_folder, config, evaluate=False)
        inspection = inspect_model(onnx.load(str(tmp_path / f"{method}.onnx")))
        assert inspection.select_ops == (4 if selects else 0)  # per block's A V: a Where per range
        failures = target_failures(inspection, "x86-vnni")
        assert any("float select" in f for f in failures) == selects, failures


@pytest.mark.parametrize("options,message", [
    (dict(target="gpu", method="ptq4vit"), "target gpu cannot run method ptq4vit"),
    (dict(target="gpu", activations="asymmetric"), "target gpu takes symmetric int8 activations"),
    (dict(target="gpu", int16_bias=True), "target gpu cannot run int16-bias"),
    (dict(target="portable", weight_dtype="int8"), "target portable is exact on every CPU"),
    (dict(target="x86-avx2", weight_dtype="int8"), "target x86-avx2 is exact on every CPU"),
    (dict(target="tpu"), "unknown target 'tpu'; choose one of portable, x86-avx2, x86-vnni, arm64, gpu"),
    (dict(activations="log2"), "unknown activations 'log2'; choose one of symmetric, asymmetric"),
])
def test_an_option_the_target_cannot_run_is_refused_in_one_line(options, message):
    with pytest.raises(ConfigError, match=message) as err:
        QuantConfig(**options)
    assert "\n" not in str(err.value)


def test_cli_refuses_an_unknown_target_before_any_work(tmp_path, capsys):
    from nq_onnx.cli import main

    def exit_code(argv: list[str]) -> int:
        try:
            return main(argv)
        except SystemExit as exc:  # argparse's own refusal of a choice
            return exc.code

    model, x, _ = convert_mlp(QuantConfig(method="minmax"), gelu=False)
    (tmp_path / "fp32.onnx").write_bytes(model.SerializeToString())
    before = (tmp_path / "fp32.onnx").read_bytes()
    np.save(tmp_path / "calib.npy", x)
    for bad, said in ((["--target", "tpu"], "invalid choice: 'tpu'"),
                      (["--target", "gpu", "--method", "ptq4vit"], "target gpu cannot run method ptq4vit")):
        argv = ["convert", str(tmp_path / "fp32.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib",
                str(tmp_path / "calib.npy"), *bad]
        assert exit_code(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert said in err[-1], err
    assert not (tmp_path / "q.onnx").exists() and (tmp_path / "fp32.onnx").read_bytes() == before


def test_asymmetric_zero_point_is_the_simulations():
    """``z = min(2^b - 1, rint(-low / s))`` in float32, as the simulation's ``Min(Round(Div(-low, s)))``."""
    assert quant.asymmetric_zero_point(-0.17, 0.01, 8) == 17
    assert quant.asymmetric_zero_point(-0.17, 0.0001, 8) == 255  # a step too small for the anchor: saturated
    assert quant.asymmetric_zero_point(-0.125, 0.05, 4) == 2  # 2.5 rounds to even


def test_an_asymmetric_quantizer_is_kept_only_where_it_wins_on_held_out_rows():
    """Fit rows one-sided as calibration saw them; held-out rows from the same distribution keep the asymmetric
    quantizer (lower held-out error, both recorded), rows that reach far below the anchor make it fall back to the
    symmetric one."""
    from nq_onnx.core.config import SearchConfig
    from nq_onnx.core.quantizers import WeightQuantizer
    from nq_onnx.search.groups import GroupSample, GroupSearch, LinearOperand, held_out_error, search_with_fallback

    rng = np.random.default_rng(4)
    x, same = gelu_like(rng, (512, 16)), gelu_like(rng, (256, 16))
    layer = LinearOperand("fc", rng.standard_normal((16, 8)).astype(np.float32), np.zeros(8, np.float32),
                          WeightQuantizer(8))
    asym = ActQuantizer(8, signed=False, low=float(x.min()))
    config = SearchConfig(tokens=512, screen_tokens=0)
    for held, asymmetric_kept in ((same, True), (same - 2.0, False)):
        sample = GroupSample(x, float(np.abs(x).max()), x.min(axis=0), x.max(axis=0), held_out=held)
        kept_problem, kept = search_with_fallback(GroupSearch(sample, (layer,), asym, config), ActQuantizer(8))
        metrics = kept.metrics["fc"]
        assert kept_problem.act.asymmetric == asymmetric_kept
        assert (metrics["mse_asymmetric_held_out"] <= metrics["mse_symmetric_held_out"]) == asymmetric_kept
        assert metrics.get("asymmetric_rejected", 0.0) == (0.0 if asymmetric_kept else 1.0)
        assert held_out_error(kept_problem, kept) == min(metrics["mse_asymmetric_held_out"],
                                                          metrics["mse_symmetric_held_out"])


def test_the_symmetric_fallback_of_an_asymmetric_group_is_searched_without_the_mean_shift():
    """NoisyQuant with its mean shift on the grid, one-sided fit rows and held-out rows reaching far below the
    anchor: the symmetric fallback wins and is kept with no shift (``b = 0``), where the same symmetric group searched
    on its own centres its channels (``b > 0``); the asymmetric technique asks for exactly that fallback."""
    import dataclasses
    from types import SimpleNamespace

    from nq_onnx.calibration.collect import TensorStats
    from nq_onnx.core.config import NoiseMode, SearchConfig
    from nq_onnx.core.quantizers import WeightQuantizer
    from nq_onnx.search.groups import GroupSample, GroupSearch, LinearOperand, search_linear_group, search_with_fallback
    from nq_onnx.techniques.asymmetric import AsymmetricActivations

    rng = np.random.default_rng(4)
    x, held = gelu_like(rng, (512, 16)), gelu_like(rng, (256, 16)) - 2.0
    layer = LinearOperand("fc", rng.standard_normal((16, 8)).astype(np.float32), np.zeros(8, np.float32),
                          WeightQuantizer(8))
    sample = GroupSample(x, float(np.abs(x).max()), x.min(axis=0), x.max(axis=0), held_out=held)
    problem = GroupSearch(sample, (layer,), ActQuantizer(8, signed=False, low=float(x.min())),
                          SearchConfig(tokens=512, screen_tokens=0), NoiseMode.BOTH, (0, 1))
    kept_problem, kept = search_with_fallback(problem, ActQuantizer(8), fallback_shifts=(0.0,))
    assert not kept_problem.act.asymmetric and kept.metrics["fc"]["asymmetric_rejected"] == 1.0
    assert kept.noise_shift == 0.0
    assert search_linear_group(dataclasses.replace(problem, act=ActQuantizer(8))).noise_shift > 0
    layers = SimpleNamespace(groups=[SimpleNamespace(name="g", tensor="x")])
    stats = {"x": TensorStats(x.min(axis=0), x.max(axis=0), len(x))}
    chosen = AsymmetricActivations().group_quantizers(QuantConfig(), layers, stats, {}, frozenset(), {})
    assert chosen["g"].fallback_shifts == (0.0,) and chosen["g"].names == ("asymmetric", "symmetric")


def test_the_default_conversion_is_the_portable_fast_model(tiny_vit, tmp_path, photo_folder):
    """``QuantConfig()`` on a small timm ViT: every weight layer int8 with 8-bit codes whose kernel pairs cannot
    saturate,
    asymmetric codes on the fc2 inputs, ``Q K^T`` on an integer kernel and ``A V`` in float, no float select: the
    ``portable`` target's checks pass, and TensorRT's do not (uint8 activations)."""
    from nq_onnx import convert

    result = convert(tiny_vit, tmp_path / "q.onnx", photo_folder, QuantConfig(calib_size=8), evaluate=False)
    inspection = inspect_model(onnx.load(str(tmp_path / "q.onnx")))
    assert target_failures(inspection, "portable") == [] and target_failures(inspection, "gpu")
    assert inspection.weight_dtypes == {"int8": len(inspection.weight_layers)}
    assert max(k.weight_bits for k in inspection.weight_layers) == 8
    assert max(k.pair_sum_bound for k in inspection.weight_layers) <= 255 * 128
    matmuls = sorted(k.layer for k in inspection.layers if not k.has_weight)
    assert matmuls == ["blocks.0.attn.MatMul", "blocks.1.attn.MatMul"], matmuls
    asymmetric = sorted(g.name for g in result.plan.groups.values() if g.low is not None)
    assert {"blocks.0.mlp.fc2", "blocks.1.mlp.fc2"} <= set(asymmetric), asymmetric
    config = result.plan.config
    assert (config.reparam, config.weight_rounding.value, config.bias_correction) == (True, "gptq", True)


def test_a_group_planned_symmetric_after_all_is_simulated_with_symmetric_codes():
    """The simulation of an asymmetric group feeds its anchor; an asymmetric group whose fallback won is fed
    ``2^(b-1) s``, which makes ``z = 2^(b-1)``: the symmetric quantizer's codes, bit for bit."""
    from nq_onnx.calibration.simulate import Simulator
    from nq_onnx.passes.base import import_graph
    from nq_onnx.pipeline import canonicalize, discover
    from nq_onnx.search.planner import float_weights

    model, x, result = convert_mlp(QuantConfig(method="easyquant", w_bits=8))
    float_model = canonicalize(model)
    layers = discover(float_model, result.plan.config)
    fc2 = next(g for g in layers.groups if g.name == "mlp.fc2")
    asym = result.plan.groups["mlp.fc2"].quantizer()
    assert asym.asymmetric
    weights = float_weights(import_graph(float_model), layers)
    for bits, scale in ((8, 0.02), (6, 0.07)):
        anchored = ActQuantizer(bits, signed=False, low=asym.low)
        sim = Simulator(float_model, layers, bits, 8, weights, {"x": x}, quantizers={"mlp.fc2": anchored})
        sim.set_group("mlp.fc1", 1.0, None)  # fc1's input quantized too, coarsely: its value is fc2's input
        sim.set_group("mlp.fc2", scale, None, symmetric_bits=bits)
        fed = sim.run([fc2.tensor])[fc2.tensor]
        chosen = next(n for n in sim._sim.graph.node if n.output[0] == f"sim/{fc2.name}/t5")
        got = sim.run([chosen.output[0]])[chosen.output[0]]
        np.testing.assert_array_equal(got, ActQuantizer(bits).fake_quant(fed, scale))


def test_a_loaded_plan_keeps_the_pair_limit_it_was_searched_under(tiny_vit, photo_folder, tmp_path):
    """An ``auto`` plan (unconstrained codes) loaded with the default ``int8-paired`` asked is written ``auto``, the
    same bytes as before, not clipped; an ``int8-paired`` plan loaded for x86-vnni keeps its pair-limited codes."""
    from nq_onnx import convert

    fast = dict(calib_size=4, method="easyquant", reparam=False, weight_rounding="nearest", bias_correction=False,
                balance_channels=False)
    for dtype, retarget in (("auto", {}), ("int8-paired", {"target": "x86-vnni"})):
        first, again = tmp_path / f"{dtype}.onnx", tmp_path / f"{dtype}_again.onnx"
        plan = tmp_path / f"{dtype}.json"
        convert(tiny_vit, first, photo_folder, QuantConfig(weight_dtype=dtype, **fast), save_plan=plan, evaluate=False)
        result = convert(tiny_vit, again, None, QuantConfig(**retarget), load_plan=plan, evaluate=False)
        assert result.plan.config.weight_dtype.value == dtype
        if not retarget:
            assert first.read_bytes() == again.read_bytes()
        layers = inspect_model(onnx.load(str(again))).weight_layers
        if dtype == "int8-paired":  # int8 everywhere, every kernel pair within the limit, on the vnni target too
            assert all(k.weight_dtype == "int8" and k.pair_sum_bound <= 255 * 128 for k in layers)
