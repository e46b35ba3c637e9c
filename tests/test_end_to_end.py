"""Export real timm architectures (random weights, small sizes) and convert them on real photographs."""

from __future__ import annotations

import dataclasses

import hashlib

import onnx
import onnxruntime as ort
import pytest

import nq_onnx
from nq_onnx import QuantConfig, SearchConfig
from nq_onnx.calibration.data import Preprocess, load_dataset
from nq_onnx.export import export_timm
from nq_onnx.inspect import inspect_model
from nq_onnx.io.model_io import load_model
from nq_onnx.pipeline import canonicalize, discover
from nq_onnx.report.summary import format_summary
from nq_onnx.core import quant

# name, timm overrides, SQNR floors (dB) of the logits: (minmax W8A8, noisyquant W8A8, noisyquant W6A6)
ARCHS = {
    "vit": ("vit_small_patch16_224", dict(img_size=64, depth=2), (25.0, 25.0, 13.0)),
    "deit": ("deit_small_patch16_224", dict(img_size=64, depth=2), (25.0, 25.0, 13.0)),
    "swin": ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 2, 4, 8)),
             (22.0, 22.0, 10.0)),
}


# A dozen 64-pixel photographs give the searches a few hundred token rows, under the default
# ``shift_min_rows``: without the mean shift the noise search keeps zero noise on these random-weight models, and
# then there is no noise graph to check. These tests are about that graph, so they let the search shift.
SHIFTING = SearchConfig(shift_min_rows=0)


@pytest.fixture(scope="module", params=sorted(ARCHS))
def exported(request, tmp_path_factory, photo_folder):
    name, kwargs, floors = ARCHS[request.param]
    path = tmp_path_factory.mktemp(request.param) / f"{request.param}.onnx"
    result = export_timm(name, path, model_kwargs=kwargs, num_classes=10, check_images=photo_folder)
    return request.param, path, result, floors


def logits(model_path, feeds):
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_export_matches_pytorch_on_real_images(exported, photo_folder):
    family, path, result, _ = exported
    assert result.max_abs_diff < 1e-4
    assert result.family == family
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    pre = Preprocess(**{k: tuple(v) if isinstance(v, list) else v
                        for k, v in __import__("json").loads(meta["nq_onnx.preprocess"]).items()})
    assert pre.input_size[1:] == tuple(model.graph.input[0].type.tensor_type.shape.dim[i].dim_value for i in (2, 3)) \
        or model.graph.input[0].type.tensor_type.shape.dim[2].dim_param
    assert meta["nq_onnx.source"].startswith("timm:")


# The paper's setting: every matmul input quantized with symmetric codes, nearest rounding, no reparameterization or
# bias correction (the graph these tests count; the defaults' graph is tests/test_targets.py's)
PAPER = dict(activations="symmetric", attention_probabilities=True, reparam=False, weight_rounding="nearest",
             bias_correction=False, balance_channels=False)


def _convert(path, tmp_path, photo_folder, **config):
    out = tmp_path / f"{config.get('method', 'noisyquant')}{config.get('w_bits', 8)}.onnx"
    result = nq_onnx.convert(path, out, photo_folder, QuantConfig(calib_size=12, search=SHIFTING, **PAPER, **config))
    return out, result


def test_convert_quality_and_graph(exported, tmp_path, photo_folder):
    family, path, _, (floor_minmax, floor_nq8, floor_nq6) = exported
    model, _ = load_model(path)
    data = load_dataset(photo_folder, model, limit=16, seed=1)
    feeds = next(data.batches(16))
    reference = logits(path, feeds)
    sqnr = {}
    for method, bits in (("minmax", 8), ("noisyquant", 8), ("easyquant", 6), ("noisyquant", 6)):
        out, result = _convert(path, tmp_path, photo_folder, method=method, w_bits=bits, a_bits=bits)
        sqnr[method, bits] = quant.sqnr_db(reference, logits(out, feeds))
        quantized = onnx.load(str(out))
        onnx.checker.check_model(quantized, full_check=True)
        ops = [n.op_type for n in quantized.graph.node]
        linear = [s for s in result.layers.layers if s.kind == "linear"]
        attention = [s for s in result.layers.layers if s.kind == "act_matmul"]
        assert len(attention) >= 2 and len(linear) >= 5
        assert ops.count("DequantizeLinear") == len(linear) + sum(len(s.inputs) for s in result.layers.layers)
        assert ops.count("QuantizeLinear") == len(result.layers.groups)
        assert "LayerNormalization" in ops and "Softmax" in ops  # stay float
        # softmax probabilities (the A V input) are non-negative: unsigned codes, zero point 0
        zero_points = {t.name: int(onnx.numpy_helper.to_array(t).reshape(-1)[0]) for t in quantized.graph.initializer
                       if t.name.endswith("/input_zero_point")}
        assert all(zero_points[f"{s.name}/input0/input_zero_point"] == 0 for s in attention if s.name.endswith("_1"))
        assert all(zero_points[f"{s.name}/input0/input_zero_point"] == 128 for s in attention
                   if not s.name.endswith("_1"))
        names = {n.name for n in quantized.graph.node}
        assert any(n.endswith("mlp.fc1/input_quantize") for n in names)
        if method == "noisyquant":
            noisy = [n for n in quantized.graph.node if n.name.endswith("/add_noise")]
            assert len(noisy) == result.summary.noise_adds <= result.summary.noisy_groups
            assert result.summary.noisy_groups > 0
            # ViT/DeiT qkv and fc1 read a LayerNorm: their noise lives in its beta, only proj and fc2 need an Add.
            # (Swin: qkv reads the window partition of the LayerNorm output and the head its mean; both keep an Add.)
            needs_add = ("attn.proj", "mlp.fc2") + (("attn.qkv", "head.fc") if family == "swin" else ())
            unexpected = [n.name for n in noisy if not n.name.split("/")[0].endswith(needs_add)]
            assert not unexpected
            inspection = inspect_model(quantized)
            assert len(inspection.weight_layers) == len(linear)
            assert not inspection.float_fallbacks, inspection.float_fallbacks
            assert inspection.noise_adds == len(noisy)
        if bits < 8:
            assert ops.count("Clip") >= len(result.layers.groups)
    assert sqnr["minmax", 8] > floor_minmax, sqnr
    assert sqnr["noisyquant", 8] > floor_nq8, sqnr
    assert sqnr["noisyquant", 6] > floor_nq6, sqnr
    twin = ort.InferenceSession(noiseless_twin(result).SerializeToString()).run(None, feeds)[0]
    assert sqnr["noisyquant", 6] > quant.sqnr_db(reference, twin) - 0.5, sqnr  # the noise's own effect


def test_plan_round_trip_and_determinism(exported, tmp_path, photo_folder):
    family, path, _, _ = exported
    config = QuantConfig(calib_size=8, w_bits=6, a_bits=6, seed=3, search=SHIFTING, **PAPER)
    a = nq_onnx.convert(path, tmp_path / "a.onnx", photo_folder, config, save_plan=tmp_path / "plan.json")
    nq_onnx.convert(path, tmp_path / "b.onnx", photo_folder, config)
    c = nq_onnx.convert(path, tmp_path / "c.onnx", load_plan=tmp_path / "plan.json")
    blobs = [(tmp_path / f"{x}.onnx").read_bytes() for x in "abc"]
    assert blobs[0] == blobs[1] == blobs[2]
    assert a.summary.noisy_groups == c.summary.noisy_groups > 0
    assert a.summary.read_tokens == ({} if family == "swin" else {17: (0,)})  # the class token, weighted
    assert c.summary.read_tokens == {}  # a loaded plan searches nothing
    if family != "swin":
        assert "read tokens (what the output reads): position 0 of 17, given 50% of each search's rows" in \
            format_summary(a.summary, 1.0, "a.onnx")
    d = nq_onnx.convert(path, tmp_path / "d.onnx", photo_folder, dataclasses.replace(config, seed=4))
    assert hashlib.sha256(blobs[0]).digest() != hashlib.sha256((tmp_path / "d.onnx").read_bytes()).digest()
    assert d.summary.noisy_groups > 0


@pytest.mark.parametrize("opset", [13, 16, 20])
def test_opsets_13_to_20_with_decomposed_layernorm(opset, tmp_path, photo_folder):
    """Below opset 17 the exporter decomposes LayerNorm (ReduceMean/Sub/Pow/Sqrt/Div): the noise still folds into
    its final bias Add, and every weight matmul still becomes an integer kernel."""
    path = tmp_path / f"vit{opset}.onnx"
    export_timm("vit_small_patch16_224", path, model_kwargs=dict(img_size=64, depth=2), num_classes=10, opset=opset)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ("LayerNormalization" in ops) == (opset >= 17)
    out, result = _convert(path, tmp_path, photo_folder, method="noisyquant", w_bits=8, a_bits=8)
    quantized = onnx.load(str(out))
    assert quantized.opset_import[0].version == opset
    inspection = inspect_model(quantized)
    assert not inspection.float_fallbacks
    assert result.summary.noise_adds <= 2 * 2 + 1  # proj and fc2 per block, and at most the head
    model, _ = load_model(path)
    feeds = next(load_dataset(photo_folder, model, limit=8, seed=1).batches(8))
    assert quant.sqnr_db(logits(path, feeds), logits(out, feeds)) > 25


def test_int16_noise_and_bias_stay_close_to_float_biases(exported, tmp_path, photo_folder):
    """N and B' as int16 codes (opset 21): no float noise constant left, integer kernels kept, and the same quality.

    The int16 rounding of N and B' (<= max|v| / 65534) flips a few activation codes downstream, so the two models
    differ by more than that rounding; the stated tolerance is on quality: logits SQNR against FP32 within 1 dB
    of the same plan with float biases (measured at W6A6: ViT -0.25, DeiT -0.75, Swin +0.07 dB)."""
    import dataclasses

    from nq_onnx.pipeline import apply_plan

    family, path, _, _ = exported
    config = QuantConfig(calib_size=8, w_bits=6, a_bits=6, int16_bias=True, search=SHIFTING, **PAPER)
    result = nq_onnx.convert(path, tmp_path / "int16.onnx", photo_folder, config)
    quantized = onnx.load(str(tmp_path / "int16.onnx"))
    assert quantized.opset_import[0].version == 21
    stored = {t.name: t for t in quantized.graph.initializer}
    int16 = [n for n, t in stored.items() if t.data_type == onnx.TensorProto.INT16]
    assert len(int16) >= result.summary.noisy_groups > 0
    assert not [n for n, t in stored.items() if n.endswith(("/noise", "/bias_denoised", "/noise_folded_bias"))]
    assert not inspect_model(quantized).float_fallbacks
    float_plan = dataclasses.replace(result.plan, config=dataclasses.replace(config, int16_bias=False))
    reference, _ = apply_plan(result.float_model, result.layers, float_plan)
    model, _ = load_model(path)
    feeds = next(load_dataset(photo_folder, model, limit=16, seed=1).batches(16))
    fp32 = logits(path, feeds)
    with_float = ort.InferenceSession(reference.SerializeToString()).run(None, feeds)[0]
    with_int16 = logits(tmp_path / "int16.onnx", feeds)
    assert abs(quant.sqnr_db(fp32, with_int16) - quant.sqnr_db(fp32, with_float)) < 1.0
    assert quant.sqnr_db(with_float, with_int16) > 15


def noiseless_twin(result):
    """The same plan with every noise removed and each noisy group back on its EasyQuant step (the step searched
    before the noise): every other choice of the sequential search kept, so the two differ by the noise alone."""
    import dataclasses

    from nq_onnx.pipeline import apply_plan

    groups = {k: dataclasses.replace(g, noise=None, scale=g.base_scale) if g.noise is not None else g
              for k, g in result.plan.groups.items()}
    model, _ = apply_plan(result.float_model, result.layers, dataclasses.replace(result.plan, groups=groups))
    return model


def test_noise_does_not_hurt_on_unseen_photographs(exported, tmp_path, photo_folder):
    """The default ``SearchConfig`` (no shift below 1024 calibration rows; a noise kept only where it beats
    EasyQuant on held-out calibration images) at W6A6, judged on crops of photographs that neither calibration nor
    the searches saw: the noise, in the default mode and in the paper's, costs at most 0.5 dB of logits SQNR
    against the same plan without it.

    The comparison is with the noiseless twin, not with a separate EasyQuant run: the search is sequential, so a
    different early choice sends every later layer's search down another path, and on these random-weight models
    that path dependence alone moves the logits SQNR by a few dB (Swin, here: the NoisyQuant plan without its
    noise 21.0 dB, EasyQuant 23.6, removing any one group's noise +-0.4). Float-rounding differences between CPUs
    flip near-tied early choices the same way, which is why a floor against EasyQuant passed on one CPU and not on
    another."""
    from nq_onnx.calibration.data import Preprocess
    from nq_onnx.demo import crops

    family, path, _, _ = exported
    photos = sorted(photo_folder.iterdir())
    calib = tmp_path / "calib"
    calib.mkdir()
    for photo in photos[:11]:
        (calib / photo.name).symlink_to(photo)
    model, _ = load_model(path)
    unseen = crops(photos[11:], Preprocess.from_model(model), seed=5)
    assert len(unseen) >= 16
    feeds = {model.graph.input[0].name: unseen}
    reference = logits(path, feeds)
    for noise in ("paper+shift", "paper"):
        out = tmp_path / f"{noise}.onnx"
        config = QuantConfig(noise=noise, w_bits=6, a_bits=6, calib_size=11, **PAPER)
        result = nq_onnx.convert(path, out, calib, config)
        twin = ort.InferenceSession(noiseless_twin(result).SerializeToString()).run(None, feeds)[0]
        with_noise, without = quant.sqnr_db(reference, logits(out, feeds)), quant.sqnr_db(reference, twin)
        assert with_noise > without - 0.5, (noise, with_noise, without)
        assert with_noise > 10.0, (noise, with_noise)


def test_the_tokens_the_output_reads_are_found_in_the_graph(exported):
    """ViT and DeiT read the class token (position 0 of 16 patches + 1); Swin pools every token: none."""
    family, path, _, _ = exported
    layers = discover(canonicalize(onnx.load(str(path))), QuantConfig())
    if family == "swin":
        assert layers.read_tokens == ()
        return
    assert layers.read_tokens == ((17, (0,)),)
    assert layers.read_rows((2, 17, 384)) == (0,)
    assert layers.read_rows((2, 16, 384)) == ()  # the patches before the class token is prepended
    assert layers.read_rows((2, 384)) == ()


def test_summary_counts_uint8_weight_layers_and_hints_int8_on_vnni(monkeypatch, tmp_path, photo_folder):
    """W8A8 with the default weight storage: the summary's uint8 layer count is what ``inspect`` reads in the model,
    and the summary suggests ``--target x86-vnni`` on a CPU with VNNI only (there int8 computes the same, faster),
    never on one without, nor when the user chose the storage."""
    import dataclasses

    import onnx

    from nq_onnx.report import summary as summary_module
    from nq_onnx.io.cpu import CpuFeatures
    from nq_onnx.inspect import inspect_model

    path = tmp_path / "vit.onnx"
    export_timm("vit_small_patch16_224", path, model_kwargs=dict(img_size=32, depth=1), num_classes=10)
    config = QuantConfig(method="minmax", calib_size=4, w_bits=8, weight_dtype="auto")
    result = nq_onnx.convert(path, tmp_path / "q.onnx", photo_folder, config,
                             evaluate=False)
    uint8 = inspect_model(onnx.load(str(tmp_path / "q.onnx"))).weight_dtypes.get("uint8", 0)
    assert result.summary.uint8_weight_layers == uint8 > 0
    hint = "--target x86-vnni (int8 weights) gives the same outputs faster"
    for flags, chosen, shown in ((("avx2", "avx512_vnni"), "auto", True), (("avx2",), "auto", False),
                                 (("avx2", "avx512_vnni"), "uint8", False)):
        monkeypatch.setattr(summary_module, "cpu_features",
                            lambda f=flags: CpuFeatures("x86_64", "test CPU", f, "/proc/cpuinfo"))
        text = format_summary(dataclasses.replace(result.summary, weight_dtype=chosen), 1.0, "q.onnx")
        assert (hint in text) == shown, (flags, chosen)


def test_summary_reports_numpys_blas_pinned_below_the_cpu(monkeypatch):
    """``OPENBLAS_CORETYPE`` naming a core without AVX-512 kernels on a CPU with AVX-512 is reported (the searches
    run at about half their GEMM speed); an AVX-512 core, a CPU without AVX-512 or no variable is not."""
    from nq_onnx.report import summary as summary_module
    from nq_onnx.io.cpu import CpuFeatures, pinned_blas
    from nq_onnx.report.summary import Summary

    avx512, avx2 = (CpuFeatures("x86_64", "test CPU", f, "/proc/cpuinfo") for f in (("avx2", "avx512f"), ("avx2",)))
    cases = (({"OPENBLAS_CORETYPE": "Haswell"}, avx512, "Haswell"), ({"OPENBLAS_CORETYPE": "SkylakeX"}, avx512, None),
             ({"OPENBLAS_CORETYPE": "Haswell"}, avx2, None), ({}, avx512, None))
    for environ, cpu, pinned in cases:
        assert pinned_blas(cpu, environ) == pinned, (environ, cpu.flags)
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.setattr(summary_module, "cpu_features", lambda: avx512)
    assert "OPENBLAS_CORETYPE=Haswell pins OpenBLAS" in format_summary(Summary("minmax", [], [], 0, {}), 1.0, "q.onnx")
    monkeypatch.setattr(summary_module, "cpu_features", lambda: avx2)
    assert "OPENBLAS_CORETYPE" not in format_summary(Summary("minmax", [], [], 0, {}), 1.0, "q.onnx")


def test_profile_accounts_for_the_conversions_seconds(tmp_path, photo_folder, capsys):
    """``convert --profile``: the stages sum to the conversion's wall time (up to the statements between them), the
    search's parts to the search stage and the linear-layer search's phases to it, every part non-negative; the CPU
    and numpy's BLAS are recorded; the same bytes as a conversion without it; an existing file is refused in one
    line unless forced, and the input model is untouched."""
    import json

    from nq_onnx.cli import main

    path = tmp_path / "vit.onnx"
    export_timm("vit_small_patch16_224", path, model_kwargs=dict(img_size=32, depth=1), num_classes=10)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    common = [str(path), "--calib", str(photo_folder), "--calib-size", "4", "--method", "noisyquant", "-q",
              "--no-eval"]
    assert main(["convert", *common, "-o", str(tmp_path / "plain.onnx")]) == 0
    profile = tmp_path / "profile.json"
    assert main(["convert", *common, "-o", str(tmp_path / "q.onnx"), "--profile", str(profile)]) == 0
    assert (tmp_path / "q.onnx").read_bytes() == (tmp_path / "plain.onnx").read_bytes()
    record = json.loads(profile.read_text())
    stages, search, phases = record["stages"], record["search"], record["linear_search"]
    assert list(stages)[:5] == ["load", "calibrate", "reparam", "balance", "search"]  # both on by default
    assert {"rewrite", "check", "save"} <= set(stages)
    # the statements between the stages, and a pause of the interpreter or the scheduler, take the rest: up to a
    # tenth of the wall time, or half a second of this conversion of about one and a half
    slack = max(0.1 * record["wall"], 0.5)
    assert record["wall"] - slack <= sum(stages.values()) <= record["wall"]
    assert {"simulate", "linear_search", "act_matmul_search", "other"} <= set(search)
    assert sum(search.values()) == pytest.approx(stages["search"], rel=1e-9)
    assert {"weight_steps", "error_terms", "act_steps", "noise", "other"} <= set(phases)
    assert sum(phases.values()) == pytest.approx(search["linear_search"], rel=1e-9)
    assert min([*stages.values(), *search.values(), *phases.values()]) >= 0
    assert record["cpu"]["kind"] and record["blas"]["architecture"] and record["config"]["method"] == "noisyquant"
    before = profile.read_bytes()
    capsys.readouterr()
    assert main(["convert", *common, "-o", str(tmp_path / "q2.onnx"), "--profile", str(profile)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "profile.json" in err
    assert profile.read_bytes() == before and not (tmp_path / "q2.onnx").exists()
    missing = tmp_path / "no-such-folder" / "profile.json"
    assert main(["convert", *common, "-o", str(tmp_path / "q3.onnx"), "--profile", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no-such-folder" in err and not (tmp_path / "q3.onnx").exists()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_the_blas_recorded_is_numpys_own_whatever_else_is_loaded():
    """threadpoolctl lists every BLAS in the process in load order; OpenCV's OpenBLAS names this CPU's kernels
    otherwise (Zen where numpy's says SkylakeX). The record and the golden digests' key read numpy's."""
    from pathlib import Path

    import numpy

    from nq_onnx.io.cpu import numpy_blas

    libs = Path(numpy.__file__).resolve().parent.parent / "numpy.libs"
    other = {"user_api": "blas", "internal_api": "openblas", "architecture": "Zen",
             "filepath": "/env/site-packages/opencv_python_headless.libs/libopenblasp-r0.so"}
    own = {"user_api": "blas", "internal_api": "openblas", "architecture": "SkylakeX",
           "filepath": str(libs / "libscipy_openblas64_.so")}
    openmp = {"user_api": "openmp", "internal_api": "openmp", "filepath": "/env/torch/lib/libgomp.so.1"}
    assert numpy_blas([openmp, other, own]) is own
    assert numpy_blas([openmp, other]) is other  # numpy's own not found (a numpy linked to a system BLAS)
    assert numpy_blas([openmp]) == {}


def test_the_searches_run_numpys_blas_on_one_thread_whatever_the_process_sets(work, monkeypatch):
    """A GEMM split over two threads can sum in another order than on one, and a search's choice with it: a
    conversion pins numpy's BLAS to one thread while it quantizes (and builds the base model it is checked
    against), and gives the process's setting back after."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from nq_onnx import pipeline
    from nq_onnx.io.cpu import numpy_blas

    seen = []
    canonicalize = pipeline.canonicalize

    def counted(model):
        seen.append(numpy_blas(threadpool_info())["num_threads"])
        return canonicalize(model)

    monkeypatch.setattr(pipeline, "canonicalize", counted)
    with threadpool_limits(limits=2, user_api="blas"):
        assert numpy_blas(threadpool_info())["num_threads"] == 2
        folder, model, calib = work
        nq_onnx.convert(model, folder / "q.onnx", calib, QuantConfig(method="easyquant"), evaluate=False)
        assert numpy_blas(threadpool_info())["num_threads"] == 2
    assert seen and set(seen) == {1}
