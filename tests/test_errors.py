"""Every bad input gives one clear line on stderr, a non-zero exit, no output, and an untouched input."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import image_model, make_model, mlp_model, save, tensor
from onnx import helper

from nq_onnx import ConfigError, QuantConfig, SearchConfig
from nq_onnx.cli import main


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fails(capsys, argv, *needles, inputs=()):
    before = {p: digest(p) for p in inputs}
    outputs = [Path(argv[i + 1]) for i, a in enumerate(argv) if a == "-o"]
    existed = {p: p.exists() for p in outputs}
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("nq-onnx: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    for path, value in before.items():
        assert digest(path) == value, f"{path} was modified"
    for path, was in existed.items():
        if not was:
            assert not path.exists(), f"{path} was written"
            assert not list(path.parent.glob(f".{path.name}.*")), "a temporary file was left behind"
    return lines[0]


def test_missing_model(capsys, work):
    tmp, _, calib = work
    fails(capsys, ["convert", tmp / "nope.onnx", "-o", tmp / "out.onnx", "--calib", calib], "not found", "nope.onnx")


@pytest.mark.parametrize("content", [b"this is not a model\n", bytes(range(256)) * 8, b""])
def test_not_an_onnx_file(capsys, work, content):
    tmp, model, calib = work
    bad = tmp / "bad.onnx"
    bad.write_bytes(content)
    fails(capsys, ["convert", bad, "-o", tmp / "out.onnx", "--calib", calib], "bad.onnx", "not an ONNX model",
          inputs=[bad])


def test_truncated_model(capsys, work):
    tmp, model, calib = work
    bad = tmp / "truncated.onnx"
    bad.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    fails(capsys, ["convert", bad, "-o", tmp / "out.onnx", "--calib", calib], "truncated.onnx", inputs=[bad])


def test_model_without_quantizable_layer(capsys, work):
    tmp, _, calib = work
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [tensor("x", ["batch", 5, 12])],
                       [tensor("y", ["batch", 5, 12])])
    path = save(model, tmp / "relu.onnx")
    fails(capsys, ["convert", path, "-o", tmp / "out.onnx", "--calib", calib], "no quantizable layer", inputs=[path])


def test_opset_below_13_is_upgraded(capsys, work):
    tmp, _, calib = work
    model = mlp_model(np.random.default_rng(1))
    model.opset_import[0].version = 11
    path = save(model, tmp / "old.onnx")
    before = digest(path)
    assert main(["convert", str(path), "-o", str(tmp / "out.onnx"), "--calib", str(calib), "-q",
                 "--method", "minmax"]) == 0
    out = onnx.load(str(tmp / "out.onnx"))
    assert out.opset_import[0].version >= 13
    assert digest(path) == before


def test_opset_above_21_is_refused(capsys, work):
    tmp, _, calib = work
    model = mlp_model(np.random.default_rng(1))
    model.opset_import[0].version = 99
    path = tmp / "future.onnx"
    path.write_bytes(model.SerializeToString())
    fails(capsys, ["convert", path, "-o", tmp / "out.onnx", "--calib", calib], "opset 99", inputs=[path])


def test_empty_calibration_folder(capsys, work):
    tmp, model, _ = work
    empty = tmp / "empty"
    empty.mkdir()
    img = save(image_model(np.random.default_rng(0)), tmp / "img.onnx")
    fails(capsys, ["convert", img, "-o", tmp / "out.onnx", "--calib", empty], "no images", inputs=[img])


def test_unreadable_calibration_folder(capsys, work):
    tmp, _, _ = work
    folder = tmp / "broken"
    folder.mkdir()
    for i in range(3):
        (folder / f"img{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    img = save(image_model(np.random.default_rng(0)), tmp / "img.onnx")
    fails(capsys, ["convert", img, "-o", tmp / "out.onnx", "--calib", folder], "none of the 3", inputs=[img])


def test_corrupt_image_is_skipped_and_counted(capsys, tmp_path, photo_folder):
    folder = tmp_path / "mixed"
    shutil.copytree(photo_folder, folder)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    img = save(image_model(np.random.default_rng(0)), tmp_path / "img.onnx")
    assert main(["convert", str(img), "-o", str(tmp_path / "out.onnx"), "--calib", str(folder), "-q",
                 "--method", "minmax", "--calib-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "1 unreadable files skipped" in out


def test_calibration_shape_that_does_not_fit(capsys, work):
    tmp, model, _ = work
    wrong = tmp / "wrong.npy"
    np.save(wrong, np.zeros((4, 5, 13), np.float32))
    fails(capsys, ["convert", model, "-o", tmp / "out.onnx", "--calib", wrong], "shape (4, 5, 13)", "?x5x12",
          inputs=[model, wrong])


def test_calibration_with_nan(capsys, work):
    tmp, model, _ = work
    bad = tmp / "nan.npy"
    values = np.zeros((4, 5, 12), np.float32)
    values[1, 2, 3] = np.nan
    np.save(bad, values)
    fails(capsys, ["convert", model, "-o", tmp / "out.onnx", "--calib", bad], "NaN", inputs=[model, bad])


def test_existing_output_without_force(capsys, work):
    tmp, model, calib = work
    out = tmp / "exists.onnx"
    out.write_bytes(b"precious")
    fails(capsys, ["convert", model, "-o", out, "--calib", calib], "exists", "--force", inputs=[model, out])


def test_output_equal_to_input_is_refused_even_with_force(capsys, work):
    tmp, model, calib = work
    fails(capsys, ["convert", model, "-o", model, "--calib", calib, "--force"], "overwrite the input",
          inputs=[model, calib])


def test_read_only_output_folder(capsys, work):
    """Refused before any work. As root (who may write anywhere chmod says not to) a sysfs folder stands in."""
    tmp, model, calib = work
    if os.geteuid() == 0:
        locked = Path("/sys")
        if not locked.is_dir():
            pytest.skip("running as root and no sysfs to stand in for a read-only folder")
        fails(capsys, ["convert", model, "-o", locked / "out.onnx", "--calib", calib], "not writable", inputs=[model])
        return
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        fails(capsys, ["convert", model, "-o", locked / "out.onnx", "--calib", calib], "not writable", inputs=[model])
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("flag", ["--w-bits", "--a-bits"])
def test_bits_outside_the_supported_set(capsys, work, flag):
    tmp, model, calib = work
    fails(capsys, ["convert", model, "-o", tmp / "out.onnx", "--calib", calib, flag, "3"], "invalid choice: 3",
          inputs=[model])
    with pytest.raises(ConfigError, match="bits"):
        QuantConfig(w_bits=9)


def test_exclude_pattern_that_matches_nothing(capsys, work):
    tmp, model, calib = work
    fails(capsys, ["convert", model, "-o", tmp / "out.onnx", "--calib", calib, "--exclude", "blocks.*"],
          "'blocks.*' matches no layer", inputs=[model])


def test_missing_calibration(capsys, work):
    tmp, model, _ = work
    fails(capsys, ["convert", model, "-o", tmp / "out.onnx"], "--calib", inputs=[model])
    fails(capsys, ["convert", model, "-o", tmp / "out.onnx", "--calib", tmp / "nowhere"], "not found", inputs=[model])


def test_plan_from_another_model_is_refused(capsys, work):
    tmp, model, calib = work
    plan = tmp / "plan.json"
    assert main(["convert", str(model), "-o", str(tmp / "a.onnx"), "--calib", str(calib), "-q", "--save-plan",
                 str(plan), "--method", "minmax"]) == 0
    other = save(mlp_model(np.random.default_rng(9)), tmp / "other.onnx")
    capsys.readouterr()
    fails(capsys, ["convert", other, "-o", tmp / "b.onnx", "--load-plan", plan], "another model",
          inputs=[other, plan])


def test_corrupt_plan_is_refused(capsys, work):
    tmp, model, calib = work
    plan = tmp / "plan.json"
    plan.write_text("{not json")
    fails(capsys, ["convert", model, "-o", tmp / "b.onnx", "--load-plan", plan], "plan.json", inputs=[model, plan])


def test_internal_error_prints_traceback_and_how_to_report(capsys, work, monkeypatch):
    tmp, model, calib = work

    def boom(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("nq_onnx.pipeline.quantize", boom)
    code = main(["convert", str(model), "-o", str(tmp / "out.onnx"), "--calib", str(calib), "-q"])
    err = capsys.readouterr().err
    assert code == 70
    assert "Traceback" in err and "ZeroDivisionError" in err and "Reporting a problem" in err
    assert "http" not in err  # points at the README's section, no address that may not exist
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "\n## Reporting a problem\n" in readme
    assert not (tmp / "out.onnx").exists()


def test_valid_protobuf_that_is_not_a_model(capsys, work):
    tmp, _, calib = work
    bad = tmp / "tensor.onnx"
    bad.write_bytes(onnx.numpy_helper.from_array(np.ones((3, 3), np.float32), "t").SerializeToString())
    fails(capsys, ["convert", bad, "-o", tmp / "out.onnx", "--calib", calib], "tensor.onnx", inputs=[bad])


def test_model_that_fails_the_checker(capsys, work):
    tmp, _, calib = work
    model = mlp_model(np.random.default_rng(0))
    model.graph.node[1].input[0] = "nowhere"  # an input nothing produces
    bad = tmp / "broken.onnx"
    bad.write_bytes(model.SerializeToString())
    fails(capsys, ["convert", bad, "-o", tmp / "out.onnx", "--calib", calib], "fails the ONNX checker",
          inputs=[bad])


@pytest.mark.parametrize("flag,value,needle", [
    ("--weight-dtype", "int4", "invalid choice: 'int4'"),
    ("--noise", "gaussian", "invalid choice: 'gaussian'"),
    ("--holdout-images", "-1", "search.holdout_images must be non-negative"),
    ("--holdout-images", "two", "invalid int value: 'two'"),
    ("--weight-rounding", "stochastic", "invalid choice: 'stochastic'"),
    ("--grid-stride", "0", "search.grid_stride must be at least 1"),
    ("--screen-tokens", "-1", "search.screen_tokens must be non-negative and search.screen_keep at least 1"),
    ("--screen-keep", "0", "search.screen_tokens must be non-negative and search.screen_keep at least 1"),
    ("--read-token-share", "1", "search.read_token_share must be a fraction in [0, 1)"),
    ("--read-token-share", "-0.1", "search.read_token_share must be a fraction in [0, 1)"),
    ("--mixed-images", "0", "mixed-images must be at least 1, got 0"),
    ("--bits-budget", "3", "bits-budget must be between 4 and 8 (average bits), got 3"),
    ("--bits-budget", "six", "invalid float value: 'six'"),
    ("--mixed-sensitivity", "hessian", "invalid choice: 'hessian'"),
    ("--objective", "spearman", "invalid choice: 'spearman'"),
    ("--ranking-loss", "-0.1", "search.ranking_loss and ranking_margin must be non-negative"),
])
def test_bad_weight_dtype_noise_mode_and_holdout(capsys, work, flag, value, needle):
    tmp, model, calib = work
    fails(capsys, ["convert", model, "-o", tmp / "out.onnx", "--calib", calib, flag, value], needle, inputs=[model])


@pytest.mark.parametrize("field,value,message", [
    ("weight_dtype", "int4", "unknown weight dtype 'int4'; choose one of auto, uint8, int8, int8-paired"),
    ("noise", "gaussian", "unknown noise mode 'gaussian'; choose one of paper, shift, paper+shift"),
    ("weight_rounding", "adaround", "unknown weight rounding 'adaround'; choose one of nearest, gptq, gptq-act"),
    ("mixed_sensitivity", "hessian",
     "unknown mixed-precision sensitivity 'hessian'; choose one of output, joint, nuclear, searched"),
    ("method", "gptq", "unknown method 'gptq'; choose one of minmax, easyquant, noisyquant, ptq4vit, "
                       "noisyquant-ptq4vit"),
])
def test_unknown_weight_dtype_or_noise_mode_in_the_api(field, value, message):
    with pytest.raises(ConfigError) as error:
        QuantConfig(**{field: value})
    assert str(error.value) == message


def test_a_search_given_as_a_dict_is_built_or_refused_in_one_line():
    config = QuantConfig(search={"rounds": 1, "act_alphas": (0.3, 1.0, 12)})
    assert config.search.rounds == 1 and config.search.act_alphas == (0.3, 1.0, 12)
    assert config == QuantConfig(search=SearchConfig(rounds=1, act_alphas=(0.3, 1.0, 12)))
    with pytest.raises(ConfigError, match="unknown search option 'round'$"):
        QuantConfig(search={"round": 1})
    with pytest.raises(ConfigError, match="search must be a SearchConfig or a dict of its fields, got int"):
        QuantConfig(search=3)
    listed = QuantConfig(search={"act_alphas": [0.3, 1.0, 12]})  # as JSON and TOML give it
    assert listed.search.act_alphas == (0.3, 1.0, 12) and QuantConfig.from_dict(listed.to_dict()) == listed
    with pytest.raises(ConfigError, match=r"^search options \['rounds'\]: "):
        QuantConfig(search={"rounds": "2"})
    with pytest.raises(ConfigError, match="unknown search option 'round'$"):
        QuantConfig.preset("paper", search={"round": 1})

