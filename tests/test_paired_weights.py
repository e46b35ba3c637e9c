"""``int8-paired`` weight storage: 8-bit codes whose kernel pairs ``|q_2i| + |q_2i+1|`` stay within 128, so that
onnxruntime's U8S8 kernel without VNNI (``vpmaddubsw``: two neighbouring u8 x s8 products into a saturating int16)
computes them exactly against any uint8 activation.

The kernel is emulated here from its instruction semantics: products of input channels ``(2i, 2i + 1)`` added and
saturated to int16, the int16 sums added in int32. Its pairing is that of MLAS's B packing (four consecutive rows
of ``K`` interleaved per column), which this machine (VNNI: exact 32-bit sums) cannot show; the emulation is
checked to saturate on unconstrained codes, so that it can fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from nq_onnx.core import quant
from nq_onnx.core.config import QuantConfig, WeightDtype
from nq_onnx.core.quantizers import WeightQuantizer
from nq_onnx.search.rounding import gptq_codes


def u8s8_without_vnni(a_u8: np.ndarray, w_s8: np.ndarray) -> np.ndarray:
    """``vpmaddubsw`` + ``vpmaddwd`` over ``[M, K] @ [K, N]``: each pair of rows ``(2i, 2i + 1)`` summed and
    saturated to int16, then added in int32 (an odd ``K`` padded with a zero row, as MLAS pads)."""
    a = np.asarray(a_u8, np.int64)
    w = np.asarray(w_s8, np.int64)
    if w.shape[0] % 2:
        a, w = np.pad(a, ((0, 0), (0, 1))), np.pad(w, ((0, 1), (0, 0)))
    pairs = a[:, 0::2, None] * w[None, 0::2, :] + a[:, 1::2, None] * w[None, 1::2, :]
    return np.clip(pairs, -(2**15), 2**15 - 1).sum(axis=1)


def worst_inputs(codes: np.ndarray) -> np.ndarray:
    """Per output channel, the uint8 rows that push every pair to its extreme: 255 where the code is positive (the
    largest positive sums) and, in a second row, where it is negative."""
    return np.concatenate([np.where(codes.T > 0, 255, 0), np.where(codes.T < 0, 255, 0)]).astype(np.uint8)


def heavy_weight(rng: np.random.Generator, k: int = 97, n: int = 40) -> np.ndarray:
    """Gaussian with outliers, some in neighbouring rows of the same column (pairs that need the limit)."""
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[10:12, :5] = 6.0
    w[40, 5:10] = -7.0
    return w


def test_limit_pairs_shares_the_excess_and_leaves_other_pairs_alone():
    """Excess 9 of (127, 10): the smaller loses 4, the larger 5; excess 100 of (-128, -100): 50 each; excess 7 of
    (125, 10) with signs: 3 and 4; (127, 3) with excess 2: 1 each; (120, 9) is within the bound."""
    codes = np.array([[127, -128, 125, 127, 120, 5], [10, -100, -10, 3, 8, 0], [100, 1, 0, 0, 7, 9]], np.int8)
    got = quant.limit_pairs(codes, 128)
    want = np.array([[122, -78, 121, 126, 120, 5], [6, -50, -7, 2, 8, 0], [100, 1, 0, 0, 7, 9]], np.int8)
    np.testing.assert_array_equal(got, want)  # the odd third row has no partner: unchanged
    assert got.dtype == np.int8
    pairs = np.abs(got[0].astype(int)) + np.abs(got[1].astype(int))
    assert pairs.max() <= 128 and np.array_equal(pairs[:4], [128] * 4)


def test_limit_pairs_is_the_nearest_pair_in_the_bound():
    """Against every pair of codes within the bound (brute force), the shared cut is the closest to the codes
    rounded without the bound, up to the half unit of an odd excess."""
    rng = np.random.default_rng(4)
    raw = rng.integers(-128, 128, size=(2, 300))
    got = quant.limit_pairs(raw.astype(np.int8), 128).astype(int)
    grid = np.arange(-128, 129)
    a, b = np.meshgrid(grid, grid, indexing="ij")
    inside = np.abs(a) + np.abs(b) <= 128
    for (x, y), (p, q) in zip(raw.T, got.T):
        best = ((a - x) ** 2 + (b - y) ** 2)[inside].min()
        assert (p - x) ** 2 + (q - y) ** 2 <= best + 1, (x, y, p, q)


def test_paired_codes_are_exact_on_the_emulated_kernel_where_unconstrained_codes_saturate():
    rng = np.random.default_rng(0)
    w = heavy_weight(rng)
    paired, full = WeightQuantizer(8, quant.KERNEL_PAIR_LIMIT), WeightQuantizer(8)
    for quantizer, exact in ((paired, True), (full, False)):
        for alpha in (1.0, 0.7):  # MinMax, and a searched smaller step that clips
            codes = quantizer.codes(w, alpha * quantizer.minmax_scales(w))
            a = worst_inputs(codes)
            same = np.array_equal(u8s8_without_vnni(a, codes), a.astype(np.int64) @ codes.astype(np.int64))
            assert same == exact, (quantizer, alpha)
            bound = quant.kernel_pair_sum_bound(codes, 0, 255).max()
            assert (bound <= quant.INT16_MAX) == exact and (bound <= 255 * 128 or not exact)


def test_paired_minmax_step_clips_nothing_and_sits_between_seven_and_eight_bits():
    """At the paired MinMax step every code is ``rint(W / s)`` (no clipping), no pair passes 128, and on gaussian
    weights the error is under 0.6x that of 7-bit codes (the portable width without the limit)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((384, 256)).astype(np.float32)
    paired = WeightQuantizer(8, quant.KERNEL_PAIR_LIMIT)
    scales = paired.minmax_scales(w)
    codes = paired.codes(w, scales)
    np.testing.assert_array_equal(codes, np.rint(w / scales[None, :]).astype(np.int8))
    assert (np.abs(codes[0::2].astype(int)) + np.abs(codes[1::2].astype(int))).max() <= 128
    np.testing.assert_array_equal(paired.fake_quant(w, scales), WeightQuantizer.dequantize(codes, scales))
    error = {name: float(np.mean((q.fake_quant(w, q.minmax_scales(w)) - w) ** 2))
             for name, q in (("paired", paired), ("7", WeightQuantizer(7)), ("8", WeightQuantizer(8)))}
    assert error["8"] < error["paired"] < 0.6 * error["7"], error


@pytest.mark.parametrize("bits", [7, 6, 4])
def test_widths_that_cannot_pass_the_limit_are_unchanged(bits):
    w = heavy_weight(np.random.default_rng(bits))
    paired, plain = WeightQuantizer(bits, quant.KERNEL_PAIR_LIMIT), WeightQuantizer(bits)
    assert not paired.paired
    np.testing.assert_array_equal(paired.minmax_scales(w), plain.minmax_scales(w))
    np.testing.assert_array_equal(paired.codes(w, plain.minmax_scales(w)), plain.codes(w, plain.minmax_scales(w)))


def test_gptq_keeps_the_pair_limit_and_beats_nearest_paired_rounding_on_held_out_rows():
    rng = np.random.default_rng(2)
    w = heavy_weight(rng, k=96, n=32)
    mix = rng.standard_normal((96, 96)).astype(np.float32) * 0.3 + np.eye(96, dtype=np.float32)
    fit, held_out = (rng.standard_normal((n, 96)).astype(np.float32) @ mix for n in (1024, 512))
    quantizer = WeightQuantizer(8, quant.KERNEL_PAIR_LIMIT)
    scales = 0.8 * quantizer.minmax_scales(w)  # a step that clips: the limit binds on the outlier pairs
    codes = gptq_codes(w, scales, fit, 8, pair_limit=quant.KERNEL_PAIR_LIMIT)
    assert quant.kernel_pair_sum_bound(codes, 0, 255).max() <= quant.INT16_MAX
    assert (np.abs(codes[0::2].astype(int)) + np.abs(codes[1::2].astype(int))).max() == 128  # it did bind
    errors = {name: float(np.mean((held_out @ (WeightQuantizer.dequantize(c, scales) - w)) ** 2))
              for name, c in (("gptq", codes), ("nearest", quantizer.codes(w, scales)))}
    assert errors["gptq"] < 0.8 * errors["nearest"], errors


def test_the_portable_targets_store_int8_paired_and_the_fast_targets_do_not():
    assert QuantConfig().weight_dtype == WeightDtype.INT8_PAIRED and QuantConfig().w_bits == 8
    assert QuantConfig().weight_pair_limit == quant.KERNEL_PAIR_LIMIT == 128
    assert QuantConfig(target="x86-avx2").weight_pair_limit == 128
    for target in ("x86-vnni", "arm64"):
        assert QuantConfig(target=target).weight_pair_limit is None
    assert QuantConfig(weight_dtype="auto").weight_pair_limit is None
    config = QuantConfig.from_dict(QuantConfig(weight_dtype="auto").to_dict())  # a plan written before: as it ran
    assert config.weight_dtype == WeightDtype.AUTO


EMULATED = """
import json, sys
import numpy as np, onnxruntime as ort
x = np.load(sys.argv[1])
def run(path, level):
    o = ort.SessionOptions(); o.graph_optimization_level = level; o.log_severity_level = 3
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].astype(np.float64)
out = {}
for path in sys.argv[2:]:
    fused = run(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    graph = run(path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    out[path] = float(np.abs(fused - graph).max() / np.abs(graph).max())
print(json.dumps(out))
"""


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None and not os.environ.get("NQ_REQUIRE_QEMU"),
                    reason="qemu-x86_64 (apt-get install qemu-user) not found")  # CI requires it
def test_on_an_emulated_cpu_without_vnni_paired_codes_are_exact_and_unconstrained_ones_saturate(tmp_path):
    """onnxruntime itself, run under ``qemu-x86_64 -cpu Haswell`` (AVX2, no VNNI: MLAS picks its saturating U8S8
    kernel), on a W8A8 layer whose codes reach the ends of their ranges: the fused kernel equals the QDQ graph for
    ``int8-paired`` and ``auto`` storage and is far from it for unconstrained int8 codes."""
    import onnx
    from conftest import make_model, tensor
    from onnx import helper, numpy_helper
    from test_kernels_exact import adversarial_input, adversarial_weight

    from nq_onnx.calibration.data import Dataset
    from nq_onnx.pipeline import quantize

    rng = np.random.default_rng(8)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="/fc/MatMul")]
    model = make_model(nodes, [tensor("x", ["batch", 32, 64])], [tensor("y", ["batch", 32, 48])],
                       [numpy_helper.from_array(adversarial_weight(rng, 64, 48), "w")])
    x = adversarial_input(rng, (2, 32, 64))
    np.save(tmp_path / "x.npy", x)
    paths = {}
    for dtype, target in (("int8", "x86-vnni"), ("int8-paired", "portable"), ("auto", "portable")):
        config = QuantConfig(method="minmax", weight_dtype=dtype, target=target, activations="symmetric",
                             reparam=False, weight_rounding="nearest", bias_correction=False,
                             balance_channels=False)
        paths[dtype] = str(tmp_path / f"{dtype}.onnx")
        onnx.save(quantize(model, "test", config, Dataset(("x",), arrays={"x": x})).model, paths[dtype])
    (tmp_path / "run.py").write_text(EMULATED)
    done = subprocess.run(["qemu-x86_64", "-cpu", "Haswell", sys.executable, str(tmp_path / "run.py"),
                           str(tmp_path / "x.npy"), *paths.values()], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    errors = {dtype: json.loads(done.stdout.splitlines()[-1])[path] for dtype, path in paths.items()}
    assert errors["int8-paired"] < 1e-5 and errors["auto"] < 1e-5, errors
    assert errors["int8"] > 0.1, errors  # the emulated CPU saturates: the check can fail
