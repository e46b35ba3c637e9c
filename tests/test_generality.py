"""Graph forms other exporters produce, robustness of writes, and determinism across processes."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import init, make_model, mlp_model, run, save, tensor
from onnx import helper, numpy_helper

import nq_onnx
from nq_onnx import OutputError, QuantConfig
from nq_onnx.core import quant
from nq_onnx.cli import main


def calib_for(tmp_path, shape, seed=0, name="calib.npy"):
    path = tmp_path / name
    np.save(path, np.random.default_rng(seed).standard_normal(shape).astype(np.float32))
    return path


def weight_chain_model(rng, k=12, n=8):
    """Four Linears whose weights sit behind Transpose, Cast(fp16), DequantizeLinear and Identity chains."""
    w = [rng.standard_normal((k, n)).astype(np.float32) for _ in range(4)]
    scale = (np.abs(w[2]).max(axis=0) / 127).astype(np.float32)
    codes = np.rint(w[2] / scale).astype(np.int8)
    nodes = [
        helper.make_node("Transpose", ["wt"], ["w0"], name="t", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w0"], ["y0"], name="/transposed/MatMul"),
        helper.make_node("Cast", ["w16"], ["w1"], name="c", to=onnx.TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "w1"], ["y1"], name="/half/MatMul"),
        helper.make_node("DequantizeLinear", ["codes", "scale", "zp"], ["w2"], name="dq", axis=1),
        helper.make_node("MatMul", ["x", "w2"], ["y2"], name="/prequantized/MatMul"),
        helper.make_node("Identity", ["w3src"], ["w3"], name="i"),
        helper.make_node("MatMul", ["x", "w3"], ["y3"], name="/deduplicated/MatMul"),
    ]
    inits = [init("wt", w[0].T), numpy_helper.from_array(w[1].astype(np.float16), "w16"),
             numpy_helper.from_array(codes, "codes"), init("scale", scale),
             numpy_helper.from_array(np.zeros(n, np.int8), "zp"), init("w3src", w[3])]
    outs = [tensor(f"y{i}", ["batch", 3, n]) for i in range(4)]
    return make_model(nodes, [tensor("x", ["batch", 3, k])], outs, inits)


def test_weights_behind_transpose_cast_dq_and_identity_are_quantized(tmp_path):
    rng = np.random.default_rng(0)
    model = save(weight_chain_model(rng), tmp_path / "chains.onnx")
    calib = calib_for(tmp_path, (16, 3, 12))
    result = nq_onnx.convert(model, tmp_path / "out.onnx", calib, QuantConfig(method="minmax"))
    assert [s.name for s in result.layers.layers] == ["transposed", "half", "prequantized", "deduplicated"]
    x = np.random.default_rng(1).standard_normal((4, 3, 12)).astype(np.float32)
    reference = run(onnx.load(str(model)), {"x": x})
    quantized = run(onnx.load(str(tmp_path / "out.onnx")), {"x": x})
    for want, got in zip(reference, quantized):
        assert quant.sqnr_db(want, got) > 30


def test_nan_in_weights_is_refused(tmp_path, capsys):
    bad = mlp_model(np.random.default_rng(0))
    w = numpy_helper.to_array(bad.graph.initializer[0]).copy()
    w[0, 0] = np.nan
    bad.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, bad.graph.initializer[0].name))
    path = save(bad, tmp_path / "nan.onnx")
    calib = calib_for(tmp_path, (8, 5, 12))
    assert main(["convert", str(path), "-o", str(tmp_path / "out.onnx"), "--calib", str(calib)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'mlp.fc1'" in err and "NaN or Inf" in err


def test_graph_output_that_is_also_a_layer_input(tmp_path):
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="/act/Relu"),
             helper.make_node("MatMul", ["r", "w"], ["y0"], name="/fc/MatMul"),
             helper.make_node("Add", ["y0", "b"], ["y"], name="/fc/Add")]
    model = make_model(nodes, [tensor("x", ["batch", 5, 12])],
                       [tensor("y", ["batch", 5, 6]), tensor("r", ["batch", 5, 12])],
                       [init("w", rng.standard_normal((12, 6))), init("b", rng.standard_normal(6))])
    path = save(model, tmp_path / "tap.onnx")
    calib = calib_for(tmp_path, (16, 5, 12))
    result = nq_onnx.convert(path, tmp_path / "out.onnx", calib, QuantConfig(method="noisyquant"))
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert [o.name for o in out.graph.output] == ["y", "r"]
    x = np.random.default_rng(3).standard_normal((2, 5, 12)).astype(np.float32)
    want, got = run(model, {"x": x}), run(out, {"x": x})
    np.testing.assert_array_equal(got[1], want[1])  # the tapped input is the float one: no noise, no rounding
    assert quant.sqnr_db(want[0], got[0]) > 25
    assert result.summary.noise_adds == sum(1 for n in out.graph.node if n.name.endswith("/add_noise"))


def _convert_in_process(tmp_path, model, calib, out, seed, method="noisyquant"):
    cmd = [sys.executable, "-m", "nq_onnx.cli", "convert", str(model), "-o", str(out), "--calib", str(calib),
           "--seed", str(seed), "--method", method, "-q", "--no-eval", "--w-bits", "6", "--a-bits", "6",
           "--save-plan", str(out.with_suffix(".json"))]
    env = dict(os.environ, PYTHONHASHSEED=str(seed + 17))  # different hash seeds per process
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return out.read_bytes(), out.with_suffix(".json").read_bytes(), out.with_suffix(".npz").read_bytes()


def test_byte_identical_across_processes_and_seed_changes_only_noise(tmp_path):
    model = save(mlp_model(np.random.default_rng(4), tokens=8, k=24, hidden=48, out=12), tmp_path / "m.onnx")
    calib = calib_for(tmp_path, (16, 8, 24))
    a = _convert_in_process(tmp_path, model, calib, tmp_path / "a.onnx", seed=0)
    b = _convert_in_process(tmp_path, model, calib, tmp_path / "b.onnx", seed=0)
    assert a[0] == b[0] and a[2] == b[2]  # model and plan arrays, byte for byte
    assert a[1].replace(b'"a.npz"', b'"b.npz"') == b[1]  # the plan JSON names its own .npz
    # the seed drives the noise only: without noise, another seed changes nothing
    e0 = _convert_in_process(tmp_path, model, calib, tmp_path / "e0.onnx", seed=0, method="easyquant")
    e1 = _convert_in_process(tmp_path, model, calib, tmp_path / "e1.onnx", seed=5, method="easyquant")
    graph = lambda blob: onnx.load_from_string(blob).graph.SerializeToString(deterministic=True)  # noqa: E731
    assert graph(e0[0]) == graph(e1[0])  # the metadata records the seed; the graph is the same
    c = _convert_in_process(tmp_path, model, calib, tmp_path / "c.onnx", seed=1)
    first = lambda blob: {t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(blob).graph.initializer}  # noqa: E731
    fa, fc = first(a[0]), first(c[0])
    changed = sorted(name for name in fa if name in fc and not np.array_equal(fa[name], fc[name]))
    # the first layer's weight scales are searched before any noise: unchanged; later layers are searched on the
    # noisy quantized output of earlier ones, so everything after the first noise may move with the seed
    assert changed and not [name for name in changed if name.startswith("mlp.fc1/weight")]


def test_disk_full_and_interrupted_writes_keep_the_previous_output(tmp_path, monkeypatch):
    model = save(mlp_model(np.random.default_rng(6)), tmp_path / "m.onnx")
    calib = calib_for(tmp_path, (8, 5, 12))
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous model")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("nq_onnx.io.model_io.os.fsync", full)
    with pytest.raises(OutputError, match="No space left on device"):
        nq_onnx.convert(model, out, calib, QuantConfig(method="minmax"), force=True)
    assert out.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npy", "m.onnx", "out.onnx"]
    monkeypatch.undo()

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr("nq_onnx.io.model_io.os.replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        nq_onnx.convert(model, out, calib, QuantConfig(method="minmax"), force=True)
    assert out.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npy", "m.onnx", "out.onnx"]


def test_bias_less_linear_before_relu_runs_as_an_integer_kernel(tmp_path):
    """onnxruntime leaves ``DQ -> MatMul -> Relu -> Q`` in float when the MatMul has no bias and the Q a non-zero
    zero point (a noisy group whose search kept zero noise); ``add_zero_bias`` makes it ``MatMul + 0``."""
    import dataclasses

    from nq_onnx.inspect import inspect_model
    from nq_onnx.io.model_io import load_model

    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "fc1.w"], ["h0"], name="/fc1/MatMul"),
             helper.make_node("Relu", ["h0"], ["h1"], name="/act/Relu"),
             helper.make_node("MatMul", ["h1", "fc2.w"], ["y"], name="/fc2/MatMul")]
    inits = [init("fc1.w", rng.standard_normal((32, 64)) / 6), init("fc2.w", rng.standard_normal((64, 16)) / 8)]
    path = save(make_model(nodes, [tensor("x", ["batch", 8, 32])], [tensor("y", ["batch", 8, 16])], inits),
                tmp_path / "m.onnx")
    result = nq_onnx.convert(path, tmp_path / "q.onnx", calib_for(tmp_path, (16, 8, 32)),
                             QuantConfig(calib_size=16, bias_correction=False))
    plan = result.plan
    for name, group in plan.groups.items():  # the noise search found nothing: signed codes, no noise, no bias
        plan.groups[name] = dataclasses.replace(group, noise=None, noise_amplitude=0.0, noise_shift=0.0)
    assert plan.groups["fc2"].signed
    model, digest = load_model(path)
    quantized = nq_onnx.quantize(model, digest, plan.config, plan=plan).model
    assert [n.name for n in quantized.graph.node if n.op_type == "Add"] == ["fc1/add_zero_bias"]
    inspection = inspect_model(quantized)
    assert [k.layer for k in inspection.layers if not k.integer] == []
    x = np.random.default_rng(5).standard_normal((2, 8, 32)).astype(np.float32)
    without = onnx.ModelProto()
    without.CopyFrom(quantized)  # the same graph with the Add bypassed: bit-identical outputs, but a float MatMul
    add = next(n for n in without.graph.node if n.op_type == "Add")
    for node in without.graph.node:
        node.input[:] = [add.input[0] if i == add.output[0] else i for i in node.input]
    without.graph.node.remove(add)
    np.testing.assert_array_equal(run(quantized, {"x": x})[0], run(without, {"x": x})[0])
    assert [k.layer for k in inspect_model(without).layers if not k.integer] == ["fc1"]


def test_export_gives_back_timms_fused_attention_setting(tmp_path):
    """Export builds its model with explicit attention matmuls, and leaves timm's process-wide flag as it found it."""
    import timm

    from nq_onnx.export import export_timm

    before = timm.layers.config._USE_FUSED_ATTN
    result = export_timm("vit_small_patch16_224", tmp_path / "vit.onnx", model_kwargs=dict(img_size=32, depth=1))
    assert timm.layers.config._USE_FUSED_ATTN == before
    ops = [n.op_type for n in onnx.load(str(result.path)).graph.node]
    assert "Softmax" in ops and ops.count("MatMul") >= 4  # qkv, Q K^T, A V, proj ... not one fused SDPA
