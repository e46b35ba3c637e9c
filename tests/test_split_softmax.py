"""The split attention-map quantizer: codes against an independent reference, its float-ONNX simulation and its
two-matmul Q/DQ form against the fake-quant reference and onnxruntime's integer kernels, its gain on real attention
maps, and a conversion that uses it checked on held-out images against the uniform quantizer it replaces."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import make_model, real_attention, run, tensor
from onnx import helper

from nq_onnx.core import quant
from nq_onnx.core.errors import ConfigError
from nq_onnx.core.quantizers import ActQuantizer
from nq_onnx.core.two_range import SplitSoftmax, TwinKind, TwinUniformQuantizer
from nq_onnx.inspect import inspect_model
from nq_onnx.techniques.split_softmax import SplitSoftmaxSettings

SPLIT = SplitSoftmaxSettings(split_softmax=True)


def reference(x: np.ndarray, bits: int, d1: float) -> tuple[np.ndarray, np.ndarray]:
    """Written from the definition, apart from nq_onnx: element by element, the fine code saturating at ``L`` and the
    coarse code of what lies above the knee ``c = L d1``, in float32."""
    levels = 2**bits - 1
    knee, d2 = np.float32(levels) * np.float32(d1), np.float32(1.0) / np.float32(levels)
    fine, coarse = np.zeros(x.shape, np.int64), np.zeros(x.shape, np.int64)
    for i, v in enumerate(np.float32(x).ravel()):
        fine.flat[i] = min(max(int(np.rint(v / np.float32(d1))), 0), levels)
        coarse.flat[i] = min(max(int(np.rint(np.float32(v - knee) / d2)), 0), levels)
    return fine, coarse


def probabilities(rng: np.random.Generator, d1: float, bits: int, shape=(2, 3, 24, 24)) -> np.ndarray:
    """Softmax rows, with exact rounding ties of the fine step up to the knee and past it, and of the coarse step
    above the knee (``c + k d2 / 2``), the largest at 1."""
    logits = rng.standard_normal(shape) * 3
    x = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    split = SplitSoftmax(bits)
    fine = np.float32(d1) * (np.arange(2 * split.levels + 4) / 2)
    coarse = split.knee(d1) + np.float32(split.fixed) * (np.arange(6) / 2)
    ties = np.concatenate([fine, coarse, [1.0]]).astype(np.float32)
    assert ties.size < x.size // 2  # most of the tensor stays softmax rows
    x.flat[: ties.size] = ties
    return x


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_split_codes_equal_the_reference_and_bound_the_error(bits):
    rng = np.random.default_rng(bits)
    split = SplitSoftmax(bits)
    d1 = split.fixed / 8
    x = probabilities(rng, d1, bits)
    got = split.codes(x, d1)
    for g, w in zip(got, reference(x, bits, d1)):
        np.testing.assert_array_equal(g, w)
    assert got[0].max() == split.levels and got[1].max() > 0  # both parts in use, the fine one to its end
    error = np.abs(split.fake_quant(x, d1) - x)
    below = x < split.knee(d1)
    assert error[below].max() <= d1 / 2 + 1e-7  # float32 rounding of the ties
    assert error[~below].max() <= split.fixed / 2 + 1e-7


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_simulation_computes_the_numpy_quantizer_bit_for_bit(bits):
    """The float-ONNX simulation the search runs (the step fed as a tensor) equals :meth:`fake_quant` exactly."""
    split = SplitSoftmax(bits)
    d1 = split.fixed / 5.3
    x = probabilities(np.random.default_rng(3), d1, bits)
    graph = gs.Graph(opset=17)
    source = gs.Variable("a", dtype=np.float32, shape=list(x.shape))
    scale = gs.Variable("s", dtype=np.float32, shape=[])
    nodes, out = split.simulate("g", source, scale)
    out.dtype, out.shape = np.float32, list(x.shape)
    graph.nodes, graph.inputs, graph.outputs = nodes, [source, scale], [out]
    got = run(gs.export_onnx(graph), {"a": x, "s": np.array(d1, np.float32)})[0]
    np.testing.assert_array_equal(got, split.fake_quant(x, d1))


def emitted(split: SplitSoftmax, d1: float, v_step: float, shapes) -> onnx.ModelProto:
    """``A @ V`` with ``A`` split-quantized and ``V`` per-tensor quantized at 8 bits."""
    a_shape, v_shape = shapes
    model = make_model([helper.make_node("MatMul", ["a", "v"], ["y"], name="/attn/MatMul_1")],
                       [tensor("a", a_shape), tensor("v", v_shape)], [tensor("y", a_shape[:-1] + v_shape[-1:])])
    graph = gs.import_onnx(model)
    node, act = graph.nodes[0], ActQuantizer(8)
    node.inputs[1] = act.emit_dequantize(graph, act.emit(graph, "v", node.inputs[1], v_step), "attn", 1)
    split.emit_matmul(graph, node, 0, d1, "layer")
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = 8
    onnx.checker.check_model(out, full_check=True)
    return out


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_two_matmul_graph_computes_the_reference_on_integer_kernels(bits):
    """The emitted parts store exactly the reference codes, the graph's output equals ``S(A) @ dq(V)`` to float
    rounding, onnxruntime runs both matmuls as integer kernels, and the graph holds no float select."""
    rng = np.random.default_rng(20 + bits)
    split = SplitSoftmax(bits)
    d1, v_step, shapes = split.fixed / 6, 0.02, ([2, 3, 24, 24], [2, 3, 24, 5])
    model = emitted(split, d1, v_step, shapes)
    a = probabilities(rng, d1, bits)
    v = rng.standard_normal(shapes[1]).astype(np.float32)
    codes = ["layer/split_fine/input_quantized", "layer/split_coarse/input_quantized"]
    model.graph.output.extend(helper.make_tensor_value_info(c, onnx.TensorProto.UINT8, None) for c in codes)
    got, fine, coarse = run(model, {"a": a, "v": v})
    want_fine, want_coarse = split.codes(a, d1)
    np.testing.assert_array_equal(fine, want_fine)
    np.testing.assert_array_equal(coarse, want_coarse)
    assert fine.max() == split.levels and coarse.max() > 0  # the fine part saturates, the coarse one is used
    want = split.fake_quant(a, d1) @ ActQuantizer(8).fake_quant(v, v_step)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    inspection = inspect_model(model)
    assert len(inspection.layers) == 2 and all(k.integer for k in inspection.layers), inspection.kernel_counts
    assert not inspection.failures and inspection.select_ops == 0
    assert not {n.op_type for n in model.graph.node} & {"Where", "Less", "Greater"}
    # below 8 bits only the fine part needs a Clip: the coarse one saturates in its QuantizeLinear
    assert [n.name for n in model.graph.node if n.op_type == "Clip"] == (["layer/split_fine/input_clip"] if bits < 8
                                                                          else [])


@pytest.mark.parametrize("bits", [6, 4])
def test_the_coarse_part_without_a_clip_tops_out_at_its_last_code(bits):
    """With the smallest knee the search tries, a probability of 1 (and just under it) has the coarse part's last
    code ``L`` on the emitted graph, as the reference says, with no ``Clip`` before that part's quantizer."""
    split = SplitSoftmax(bits)
    d1 = split.fixed / 2.0**12
    a = probabilities(np.random.default_rng(bits), d1, bits, shape=(1, 2, 24, 24))
    a.flat[-4:] = np.float32([1.0, np.nextafter(np.float32(1), np.float32(0)), 1.0 - split.fixed / 4, 0.0])
    model = emitted(split, d1, 0.02, ([1, 2, 24, 24], [1, 2, 24, 3]))
    model.graph.output.extend([helper.make_tensor_value_info("layer/split_coarse/input_quantized",
                                                             onnx.TensorProto.UINT8, None)])
    coarse = run(model, {"a": a, "v": np.ones((1, 2, 24, 3), np.float32)})[1]
    np.testing.assert_array_equal(coarse, split.codes(a, d1)[1])
    np.testing.assert_array_equal(coarse.flat[-4:], [split.levels, split.levels, split.levels, 0])


def test_split_beats_the_uniform_and_the_twin_quantizer_on_real_attention_maps():
    """Attention probabilities of the demo's ViT-S/14 (real weights) on a photograph: at 4 and 6 bits the split
    (its fine step chosen over its search grid) gives ``A V`` a higher SQNR than one unsigned uniform range with its
    best step over the same multiples of the MinMax step, by more than 3 dB, and than PTQ4ViT's twin of the same
    width over its own grid."""
    a, v = real_attention()
    target = a @ v
    for bits in (4, 6):
        uniform, alphas = ActQuantizer(bits, signed=False), np.linspace(0.05, 1.0, 20)
        steps = uniform.candidates(uniform.minmax_scale(float(a.max())), alphas)
        sqnr_uniform = max(quant.sqnr_db(target, uniform.fake_quant(a, s) @ v) for s in steps)
        twin = TwinUniformQuantizer(bits, TwinKind.SOFTMAX)
        d2 = 1.0 / twin.levels
        sqnr_twin = max(quant.sqnr_db(target, twin.fake_quant(a, d2 / 2**m, d2) @ v) for m in range(1, 17))
        split = SplitSoftmax(bits)
        grid = split.candidates(split.minmax_scale(float(a.max())), alphas)
        sqnr_split = max(quant.sqnr_db(target, split.fake_quant(a, d1) @ v) for d1 in grid)
        assert sqnr_split > sqnr_uniform + 3.0 and sqnr_split > sqnr_twin, (bits, sqnr_split, sqnr_twin, sqnr_uniform)


@pytest.mark.parametrize("options,message", [
    ({"attention_probabilities": False}, "add --attention-probabilities"),
    ({"quantize_attention_matmuls": False}, "drop --no-attention-matmuls"),
    ({"method": "noisyquant-ptq4vit"}, "not noisyquant-ptq4vit"),
    ({"method": "minmax"}, "not minmax"),
    ({"target": "gpu", "activations": "symmetric"}, "target gpu cannot run split-softmax"),
    ({"bits_budget": 6.0, "mixed_sensitivity": "searched", "activations": "symmetric"}, "mixed-sensitivity searched"),
])
def test_the_split_is_refused_where_it_could_not_apply(options, message):
    from nq_onnx import QuantConfig

    with pytest.raises(ConfigError, match=message):
        QuantConfig(**{"attention_probabilities": True, **options}, techniques=(SPLIT,))


def test_settings_that_leave_the_split_off_are_dropped_and_unknown_kinds_refused():
    from nq_onnx import QuantConfig
    from nq_onnx.core.errors import PlanError
    from nq_onnx.core.plan import TwinSpec

    assert QuantConfig(attention_probabilities=True, techniques=(SPLIT,)).techniques == (SPLIT,)
    assert QuantConfig(techniques=(SplitSoftmaxSettings(split_softmax=False),)).techniques == ()
    assert isinstance(TwinSpec("split", 1 / 63).quantizer(6), SplitSoftmax)
    with pytest.raises(PlanError, match="unknown two-range quantizer kind 'splt'"):
        TwinSpec("splt", 1 / 63)


def test_the_report_and_the_summary_name_the_split():
    """The report gives a split group's fine and coarse steps under its own name, and the summary counts the
    attention maps whose split lost to the uniform quantizer apart from the twin's."""
    from nq_onnx.report.page import _step
    from nq_onnx.report.summary import Summary, format_summary

    row = {"act_scale": 0.001, "signed": False, "twin": {"kind": "split", "fixed": 1 / 63}}
    assert _step(row, lambda x: f"{x:.4g}") == "split: 0.001 / 0.01587"
    fields = {f.name: f for f in dataclasses.fields(Summary)}
    summary = Summary(**{n: ([] if "list" in str(f.type) else {} if "dict" in str(f.type) else 0)
                         for n, f in fields.items() if f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING}, split_rejected=2)
    text = format_summary(summary, 1.0, "q.onnx")
    assert "split attention-map quantizer dropped in 2 groups" in text and "twin-uniform quantizer dropped" not in text


def sharpen_attention(path, factor: float) -> None:
    """Scale every qkv weight of the model at ``path`` by ``factor``: attention logits by ``factor^2``."""
    model = onnx.load(str(path))
    names = {n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and "qkv" in n.name}
    assert names
    for t in model.graph.initializer:
        if t.name in names:
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) * np.float32(factor), t.name))
    onnx.save(model, str(path))


def test_convert_with_the_split_beats_the_uniform_attention_map_on_held_out_images(tmp_path, photo_folder):
    """A DeiT at initialization whose qkv weights are scaled 4x (197 tokens; sharp attention maps, as trained models
    have, where at initialization they are near ``1/197``) at W6A6 with every matmul input quantized: with
    ``--split-softmax`` every attention map is split (or its uniform fallback recorded), both parts run on integer
    kernels with no float select, the saved plan reloads to the same model bytes, and the model's output SQNR on
    photographs no
    conversion saw is higher than the same conversion's with uniform attention maps (13.6 against 11.2 dB here)."""
    from nq_onnx import QuantConfig, SearchConfig, convert
    from nq_onnx.calibration.data import load_dataset
    from nq_onnx.calibration.runtime import session
    from nq_onnx.export import export_timm

    path = tmp_path / "deit.onnx"
    export_timm("deit_small_patch16_224", path, model_kwargs=dict(img_size=224, depth=2), num_classes=10)
    sharpen_attention(path, 4.0)
    photos = sorted(photo_folder.iterdir())
    calib, held = tmp_path / "calib", tmp_path / "held"
    for folder, files in ((calib, photos[:12]), (held, photos[12:])):
        folder.mkdir()
        for file in files:
            (folder / file.name).symlink_to(file)
    feeds = list(load_dataset(held, onnx.load(str(path)), limit=16, seed=0).batches(8))

    def outputs(p):
        s = session(onnx.load(str(p)))
        return np.concatenate([s.run(None, f)[0] for f in feeds])

    reference, sqnr, results = outputs(path), {}, {}
    for name, techniques in (("uniform", ()), ("split", (SPLIT,))):
        config = QuantConfig(method="easyquant", w_bits=6, a_bits=6, calib_size=12, attention_probabilities=True,
                             search=SearchConfig(shift_min_rows=0, tokens=256), techniques=techniques)
        results[name] = convert(path, tmp_path / f"{name}.onnx", calib, config, evaluate=False,
                                save_plan=tmp_path / f"{name}.json")
        sqnr[name] = quant.sqnr_db(reference, outputs(tmp_path / f"{name}.onnx"))
    assert sqnr["split"] > sqnr["uniform"] + 1.0, sqnr
    result = results["split"]
    splits = [g for g in result.plan.groups.values() if g.twin is not None]
    attention = [g for g in result.layers.groups if g.after == "softmax"]
    rejected = sum(1 for p in result.plan.layers.values() if p.search.get("twin_rejected"))
    assert {g.twin.kind for g in splits} == {"split"} and len(splits) + rejected == len(attention) == 2
    model = onnx.load(str(tmp_path / "split.onnx"))
    inspection = inspect_model(model)
    parts = [k for k in inspection.layers if "/split_" in k.layer]
    assert len(parts) == 2 * len(splits) and all(k.integer for k in parts) and inspection.select_ops == 0
    assert not inspection.failures
    again = convert(path, tmp_path / "again.onnx", calib, load_plan=tmp_path / "split.json", evaluate=False)
    assert again.plan.config.techniques == (SPLIT,)
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "split.onnx").read_bytes()


def test_the_command_line_has_the_flag_and_refuses_it_without_a_quantized_attention_map(tmp_path, capsys):
    """``--split-softmax`` is a flag of ``convert`` in a fresh program (the built-in techniques' settings are
    loaded with the parser), its config prints as a ``[split_softmax]`` table, and without
    ``--attention-probabilities`` it is refused in one line, nothing written."""
    import subprocess
    import sys

    from nq_onnx.cli.main import _config_from, build_parser, main

    args = build_parser().parse_args(["convert", "m.onnx", "-o", "o.onnx", "--split-softmax",
                                      "--attention-probabilities"])
    assert _config_from(args).techniques == (SPLIT,)
    printed = subprocess.run([sys.executable, "-m", "nq_onnx.cli", "convert", "m.onnx", "-o", "o.onnx",
                              "--split-softmax", "--attention-probabilities", "--print-config"],
                             capture_output=True, text=True, check=True).stdout
    assert "[split_softmax]\nsplit_softmax = true\n" in printed
    out = tmp_path / "o.onnx"
    assert main(["convert", str(tmp_path / "missing.onnx"), "-o", str(out), "--split-softmax"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["nq-onnx: error: split-softmax splits the quantized attention map of A@V: add "
                   "--attention-probabilities"] and not out.exists()
