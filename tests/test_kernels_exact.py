"""onnxruntime's integer kernels compute the QDQ graph's arithmetic exactly, on this CPU whatever it is.

Every integer layer kind nq-onnx emits (a 3-D weight MatMul, a Gemm head rewritten to a 3-D MatMul, ``Q K^T``
with two signed operands, ``A V`` with unsigned softmax probabilities) is converted by the real pipeline
(MinMax, so calibrating on the same inputs puts the codes at the ends of their ranges), run with every graph
optimization on, and compared with an int64 numpy reference of the QDQ arithmetic written from the plan:
``y = s_a s_w (q_a @ q_w) + B``. Weight rows and input signs are aligned so that neighbouring products add up
to ``2 * 255 * 127 = 64770`` at W8A8: an int8 weight layer run on a U8S8 kernel without VNNI saturates there.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_model, tensor
from onnx import helper, numpy_helper

from nq_onnx.core import quant
from nq_onnx.calibration.data import Dataset
from nq_onnx.core.config import QuantConfig
from nq_onnx.io.cpu import cpu_features
from nq_onnx.inspect import inspect_model
from nq_onnx.pipeline import quantize

K, N, T, HEADS, D = 64, 48, 32, 2, 16


def optimized_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def adversarial_weight(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    """``+-1`` with the sign of each output channel shared by all its rows (every channel's codes reach
    ``+-qmax`` and add up in pairs), half the channels also carry small random values."""
    w = np.repeat(rng.choice([-1.0, 1.0], size=(1, n)), k, axis=0)
    w[:, n // 2:] *= rng.uniform(0.5, 1.0, size=(k, n - n // 2))
    return w.astype(np.float32)


def adversarial_input(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """``+-3`` everywhere (the MinMax range: codes at both ends), the first rows all positive."""
    x = rng.choice([-3.0, 3.0], size=shape).astype(np.float32)
    x.reshape(-1, shape[-1])[:4] = 3.0
    return x


def linear_model(rng):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="/fc/MatMul"),
             helper.make_node("Add", ["h", "b"], ["y"], name="/fc/Add")]
    inits = [numpy_helper.from_array(adversarial_weight(rng, K, N), "w"),
             numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "b")]
    return make_model(nodes, [tensor("x", ["batch", T, K])], [tensor("y", ["batch", T, N])], inits)


def gemm_head_model(rng):
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="/head/Gemm", transB=1)]
    inits = [numpy_helper.from_array(np.ascontiguousarray(adversarial_weight(rng, K, N).T), "w"),
             numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "b")]
    return make_model(nodes, [tensor("x", ["batch", K])], [tensor("y", ["batch", N])], inits)


def qk_model(rng):
    nodes = [helper.make_node("MatMul", ["q", "kt"], ["y"], name="/attn/MatMul")]
    return make_model(nodes, [tensor("q", ["batch", HEADS, T, D]), tensor("kt", ["batch", HEADS, D, T])],
                      [tensor("y", ["batch", HEADS, T, T])])


def av_model(rng):
    nodes = [helper.make_node("Softmax", ["s"], ["a"], name="/attn/Softmax", axis=-1),
             helper.make_node("MatMul", ["a", "v"], ["y"], name="/attn/MatMul_1")]
    return make_model(nodes, [tensor("s", ["batch", HEADS, T, T]), tensor("v", ["batch", HEADS, T, D])],
                      [tensor("y", ["batch", HEADS, T, D])])


def feeds_of(kind: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if kind == "linear":
        return {"x": adversarial_input(rng, (2, T, K))}
    if kind == "gemm_head":
        return {"x": adversarial_input(rng, (16, K))}
    if kind == "qk":
        return {"q": adversarial_input(rng, (2, HEADS, T, D)), "kt": adversarial_input(rng, (2, HEADS, D, T))}
    s = np.full((2, HEADS, T, T), -30.0, np.float32)
    s[..., 0] = 30.0  # one-hot rows: probabilities at code 2^b - 1 and 0
    s[:, :, ::2, :] = rng.standard_normal((2, HEADS, T // 2, T)).astype(np.float32) * 4
    return {"s": s, "v": adversarial_input(rng, (2, HEADS, T, D))}


BUILDERS = {"linear": linear_model, "gemm_head": gemm_head_model, "qk": qk_model, "av": av_model}


def convert(kind: str, bits: int, weight_dtype: str = "auto"):
    rng = np.random.default_rng(bits)
    model = BUILDERS[kind](rng)
    feeds = feeds_of(kind, rng)
    target = "x86-vnni" if weight_dtype == "int8" else "portable"  # portable refuses int8 weights (not exact)
    config = QuantConfig(method="minmax", w_bits=bits, a_bits=bits, weight_dtype=weight_dtype, target=target,
                         activations="symmetric", attention_probabilities=True, reparam=False,
                         weight_rounding="nearest", bias_correction=False, balance_channels=False)
    result = quantize(model, "test", config, Dataset(tuple(feeds), arrays=feeds))
    return model, feeds, result


def codes(x: np.ndarray, scale: float, bits: int, signed: bool) -> np.ndarray:
    """Independent of nq_onnx.core.quant: float32 division, ties to even, saturation to the b-bit range."""
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return np.rint(np.float32(x) / np.float32(scale)).clip(lo, hi).astype(np.int64)


def reference(kind: str, model: onnx.ModelProto, feeds: dict[str, np.ndarray], result) -> np.ndarray:
    """``s_a s_w (q_a @ q_w) + B`` (linear) or ``s_a s_b (q_a @ q_b)`` (activation matmul), in float64."""
    plan, layers = result.plan, result.layers
    bits = plan.config.a_bits
    groups = {g.tensor: plan.groups[g.name] for g in layers.groups}
    if kind in ("linear", "gemm_head"):
        weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        w = weights["w"] if kind == "linear" else weights["w"].T
        spec = layers.layers[0]
        s_w = plan.layers[spec.name].weight_scales.astype(np.float32)
        q_w = np.rint(w / s_w[None, :]).clip(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).astype(np.int64)
        g = groups[spec.inputs[0]]
        q_x = codes(feeds["x"], g.scale, bits, g.signed)
        acc = (q_x.reshape(-1, K) @ q_w).astype(np.float64)
        y = acc * np.float64(np.float32(g.scale)) * s_w.astype(np.float64) + weights["b"]
        return y.reshape(*feeds["x"].shape[:-1], N)
    a_name, b_name = layers.layers[0].inputs
    a_value = feeds[a_name] if a_name in feeds else _softmax(feeds["s"])
    ga, gb = groups[a_name], groups[b_name]
    acc = (codes(a_value, ga.scale, bits, ga.signed) @ codes(feeds[b_name], gb.scale, bits, gb.signed))
    return acc.astype(np.float64) * np.float64(np.float32(ga.scale)) * np.float64(np.float32(gb.scale))


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=-1, keepdims=True), dtype=np.float32)
    return e / e.sum(axis=-1, keepdims=True)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("weight_dtype", ["auto", "uint8", "int8-paired"])
@pytest.mark.parametrize("bits", [8, 7, 6, 5, 4])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_integer_kernels_equal_the_qdq_arithmetic_on_this_cpu(kind, bits, weight_dtype):
    model, feeds, result = convert(kind, bits, weight_dtype)
    inspection = inspect_model(result.model)
    assert [k.integer for k in inspection.layers] == [True], inspection.layers  # an integer kernel ran
    assert not inspection.overflow_layers
    want = reference(kind, model, feeds, result)
    got = optimized_run(result.model, feeds)
    # float rounding only: onnxruntime scales the exact int32 sum by s_a * s_w in float32
    assert relative_error(got, want) < 1e-5, (kind, bits, relative_error(got, want))
    if kind in ("qk", "av"):
        signed = [result.plan.groups[g.name].signed for g in result.layers.groups]
        assert signed == ([True, True] if kind == "qk" else [False, True])


@pytest.mark.parametrize("kind", ["linear", "gemm_head"])
def test_w8a8_codes_are_adversarial_and_auto_stores_them_uint8(kind):
    """The inputs above do reach pair sums beyond int16, so the exactness test exercises the saturating case."""
    model, feeds, result = convert(kind, 8)
    layer = inspect_model(result.model).weight_layers[0]
    assert layer.weight_dtype == "uint8" and layer.input_codes == (0, 255)
    spec = result.layers.layers[0]
    group = result.plan.groups[result.layers.groups[0].name]
    stored_x = codes(feeds["x"], group.scale, 8, True).reshape(-1, K) + 128
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w = weights["w"] if kind == "linear" else weights["w"].T
    q_w = np.rint(w / result.plan.layers[spec.name].weight_scales[None, :]).astype(np.int64)
    pairs = stored_x[:, 0::2, None] * q_w[None, 0::2, :] + stored_x[:, 1::2, None] * q_w[None, 1::2, :]
    assert np.abs(pairs).max() > quant.INT16_MAX


def test_int8_weights_saturate_exactly_where_the_cpu_lacks_vnni():
    """``--weight-dtype int8`` (for VNNI deployments): ``inspect`` flags every W8A8 layer, and whether this CPU
    really saturates is what :mod:`nq_onnx.io.cpu` predicts from its flags."""
    cpu = cpu_features()
    if cpu.u8s8_saturates is None:
        pytest.skip("this CPU's features could not be read")
    model, feeds, result = convert("linear", 8, "int8")
    inspection = inspect_model(result.model)
    layer = inspection.weight_layers[0]
    assert layer.integer and layer.weight_dtype == "int8"
    assert layer.can_overflow and layer.pair_sum_bound == 2 * 255 * 127
    error = relative_error(optimized_run(result.model, feeds), reference("linear", model, feeds, result))
    if cpu.u8s8_saturates:
        assert error > 0.05, error  # the U8S8 kernel clamps pair sums at 32767
    else:
        assert error < 1e-5, error


@pytest.mark.parametrize("bits", [7, 6, 5, 4])
def test_auto_keeps_int8_where_no_pair_can_overflow(bits):
    _, _, result = convert("linear", bits)
    layer = inspect_model(result.model).weight_layers[0]
    assert layer.weight_dtype == "int8" and not layer.can_overflow
    assert layer.pair_sum_bound <= quant.INT16_MAX


def test_pair_sum_bound_is_the_largest_pair_over_any_codes():
    rng = np.random.default_rng(3)
    w = rng.integers(-128, 128, size=(7, 5))
    lo, hi = 96, 159
    brute = np.zeros(5, np.int64)
    for i in range(7):
        for j in range(7):
            if i == j:
                continue
            for a in (lo, hi):
                for b in (lo, hi):
                    brute = np.maximum(brute, np.abs(a * w[i] + b * w[j]))
    np.testing.assert_array_equal(quant.pair_sum_bound(w, lo, hi), brute)


def test_cli_weight_dtype_and_strict_inspect(tmp_path, capsys):
    """``convert --target x86-vnni`` writes int8 weights, which ``inspect --strict`` and ``inspect --target
    portable`` refuse (exit 1, the layer named, the CPU printed) and ``--target x86-vnni`` accepts; the default
    passes all three; ``--json`` carries the CPU features and the bound per layer."""
    import json

    from nq_onnx.cli import main

    rng = np.random.default_rng(8)
    model = linear_model(rng)
    (tmp_path / "fp32.onnx").write_bytes(model.SerializeToString())
    np.save(tmp_path / "calib.npy", feeds_of("linear", rng)["x"])
    common = ["--calib", str(tmp_path / "calib.npy"), "--method", "minmax", "-q", "--no-eval"]
    assert main(["convert", str(tmp_path / "fp32.onnx"), "-o", str(tmp_path / "auto.onnx"), *common]) == 0
    assert main(["convert", str(tmp_path / "fp32.onnx"), "-o", str(tmp_path / "int8.onnx"), "--target", "x86-vnni",
                 *common]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "auto.onnx"), "--strict"]) == 0
    text = capsys.readouterr().out
    assert "exact on every CPU" in text and f"; {cpu_features().kind};" in text
    for target in ("portable", "x86-avx2", "x86-vnni"):
        assert main(["inspect", str(tmp_path / "auto.onnx"), "--target", target]) == 0
        assert capsys.readouterr().out.rstrip().endswith(f"target {target}: the model suits it")
    assert main(["inspect", str(tmp_path / "int8.onnx"), "--target", "portable"]) == 1
    assert "target portable: fc: pair sums up to 64770 saturate int16 on x86 without VNNI" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "int8.onnx"), "--target", "x86-vnni"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "int8.onnx"), "--strict"]) == 1
    text = capsys.readouterr().out
    assert "fc  " in text and f"pair sums up to {2 * 255 * 127} overflow int16 without VNNI" in text
    assert main(["inspect", str(tmp_path / "int8.onnx"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["cpu"]["flags"] == list(cpu_features().flags) and doc["layers_can_overflow_without_vnni"] == 1
    assert doc["layers"][0]["weight_dtype"] == "int8" and doc["layers"][0]["pair_sum_bound"] == 2 * 255 * 127
