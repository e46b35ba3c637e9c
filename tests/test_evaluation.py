"""What a conversion is judged on: held-out calibration-source inputs by default, evaluation data with labels
from a file, class sub-folders or an .npz, latency against FP32, and the bad inputs refused before any work."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import image_model, save
from PIL import Image

import nq_onnx
from nq_onnx import QuantConfig
from nq_onnx.calibration.data import Preprocess, load_dataset, prepare_image
from nq_onnx.io.cpu import cpu_features
from nq_onnx.core.errors import ConfigError, DataError
from nq_onnx.io.model_io import load_model
from nq_onnx.report.summary import format_summary

FAST = dict(method="minmax", reparam=False, weight_rounding="nearest", bias_correction=False, balance_channels=False)


@pytest.fixture
def classifier(tmp_path):
    return save(image_model(np.random.default_rng(0)), tmp_path / "classifier.onnx")


def outputs(path: Path, images: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": images})[0]


def prepared(model: Path, files: list[Path]) -> np.ndarray:
    pre = Preprocess.from_model(load_model(model)[0])
    images = []
    for path in files:
        with Image.open(path) as image:
            images.append(prepare_image(image, pre))
    return np.stack(images)


def expect(reference: np.ndarray, quantized: np.ndarray, metrics: dict, labels: np.ndarray | None = None) -> None:
    """``metrics`` are the output error (and top-1) of ``quantized`` against ``reference``, computed here in numpy."""
    ref, out = reference.astype(np.float64), quantized.astype(np.float64)
    np.testing.assert_allclose(metrics["mse"], np.mean((ref - out) ** 2), rtol=1e-5)
    np.testing.assert_allclose(metrics["sqnr_db"], 10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2)),
                               rtol=1e-5)
    assert metrics["top1_agreement"] == np.mean(ref.argmax(1) == out.argmax(1))
    if labels is not None:
        assert metrics["top1"] == np.mean(out.argmax(1) == labels)


def test_the_default_evaluates_on_calibration_folder_images_the_conversion_never_read(classifier, tmp_path,
                                                                                      photo_folder):
    """12 of the folder's 16 photographs calibrate: the output error is measured on the other 4, as onnxruntime
    computes it on them, and the output model is the one a conversion without evaluation writes."""
    config = QuantConfig(calib_size=12, w_bits=6, a_bits=6, **FAST)
    result = nq_onnx.convert(classifier, tmp_path / "q.onnx", photo_folder, config)
    nq_onnx.convert(classifier, tmp_path / "plain.onnx", photo_folder, config, evaluate=False)
    assert (tmp_path / "q.onnx").read_bytes() == (tmp_path / "plain.onnx").read_bytes()
    calib = set(load_dataset(photo_folder, load_model(classifier)[0], limit=12, seed=0).files)
    held = sorted(set(photo_folder.iterdir()) - calib)
    assert len(held) == 4 and len(calib) == 12
    images = prepared(classifier, held)
    expect(outputs(classifier, images), outputs(tmp_path / "q.onnx", images), result.summary.metrics["minmax"])
    assert set(result.summary.metrics) == {"minmax"}  # no labels: no FP32 top-1
    evaluation = result.summary.evaluation
    assert (evaluation.kind, evaluation.images, evaluation.labels) == ("held-out", 4, "")
    text = format_summary(result.summary, 1.0, "q.onnx")
    assert "  held out: 4 calibration-folder images the search never saw" in text.splitlines()
    assert "output vs FP32: SQNR" in text and "latency" not in text


def test_another_seed_holds_out_other_images(classifier, tmp_path, photo_folder):
    model = load_model(classifier)[0]
    held = {}
    for seed in (0, 1):
        config = QuantConfig(calib_size=12, seed=seed, **FAST)
        result = nq_onnx.convert(classifier, tmp_path / f"q{seed}.onnx", photo_folder, config)
        assert result.summary.evaluation.images == 4
        calib = set(load_dataset(photo_folder, model, limit=12, seed=seed).files)
        held[seed] = sorted(set(photo_folder.iterdir()) - calib)
        images = prepared(classifier, held[seed])
        expect(outputs(classifier, images), outputs(tmp_path / f"q{seed}.onnx", images),
               result.summary.metrics["minmax"])
    assert held[0] != held[1]


def test_a_folder_with_nothing_to_spare_is_evaluated_on_calibration_images_and_says_so(classifier, tmp_path,
                                                                                        photo_folder):
    result = nq_onnx.convert(classifier, tmp_path / "q.onnx", photo_folder, QuantConfig(calib_size=64, **FAST))
    evaluation = result.summary.evaluation
    assert (evaluation.kind, evaluation.images) == ("calibration", 16)
    images = prepared(classifier, sorted(photo_folder.iterdir()))
    expect(outputs(classifier, images), outputs(tmp_path / "q.onnx", images), result.summary.metrics["minmax"])
    assert (f"  calibration images: 16 images the search saw ({photo_folder} has none to spare; --eval DATA "
            "measures on unseen ones)") in format_summary(result.summary, 1.0, "q.onnx")


def test_tensor_calibration_holds_out_the_rows_after_calib_size_with_their_labels(classifier, tmp_path):
    """An .npz of 40 inputs with labels, 16 calibrating: rows 16..39 are evaluated, top-1 of both models on their
    labels (half of them the float model's own classes, so that top-1 is neither 0 nor 1 by chance)."""
    rng = np.random.default_rng(3)
    images = rng.standard_normal((40, 3, 8, 8)).astype(np.float32)
    fp32 = outputs(classifier, images)
    labels = np.where(np.arange(40) % 2 == 0, fp32.argmax(1), rng.integers(0, 10, 40))
    np.savez(tmp_path / "calib.npz", input=images, labels=labels)
    result = nq_onnx.convert(classifier, tmp_path / "q.onnx", tmp_path / "calib.npz",
                             QuantConfig(calib_size=16, w_bits=6, a_bits=6, **FAST))
    quantized = outputs(tmp_path / "q.onnx", images[16:])
    metrics = result.summary.metrics
    expect(fp32[16:], quantized, metrics["minmax"], labels[16:])
    assert metrics["fp32"]["top1"] == np.mean(fp32[16:].argmax(1) == labels[16:])
    assert 0 < metrics["fp32"]["top1"] < 1
    text = format_summary(result.summary, 1.0, "q.onnx")
    assert "held out: 24 calibration-file inputs the search never saw; labels: the .npz's labels array" in text
    change = 100 * (metrics["minmax"]["top1"] - metrics["fp32"]["top1"])
    assert (f"  top-1: FP32 {metrics['fp32']['top1']:.2%}, quantized {metrics['minmax']['top1']:.2%} "
            f"({change:+.2f} points)") in text


@pytest.fixture
def class_tree(tmp_path, photo_folder):
    """Three class sub-folders of four photographs each (sorted names: the class index)."""
    tree = tmp_path / "classes"
    photos = sorted(photo_folder.iterdir())
    for index, name in enumerate(("cat", "dog", "emu")):
        (tree / name).mkdir(parents=True)
        for photo in photos[4 * index: 4 * index + 4]:
            shutil.copy(photo, tree / name / photo.name)
    return tree


def test_eval_data_in_class_folders_gives_top1_of_both_models(classifier, tmp_path, photo_folder, class_tree):
    result = nq_onnx.convert(classifier, tmp_path / "q.onnx", photo_folder, QuantConfig(calib_size=8, **FAST),
                             eval_data=class_tree)
    files = sorted(class_tree.rglob("*.*"))
    labels = np.array([("cat", "dog", "emu").index(f.parent.name) for f in files])
    images = prepared(classifier, files)
    fp32, quantized = outputs(classifier, images), outputs(tmp_path / "q.onnx", images)
    expect(fp32, quantized, result.summary.metrics["minmax"], labels)
    assert result.summary.metrics["fp32"]["top1"] == np.mean(fp32.argmax(1) == labels)
    assert result.summary.evaluation.describe() == (f"eval data: 12 images of {class_tree}; labels: class "
                                                    "sub-folders (3 classes)")


def test_eval_labels_file_follows_the_sorted_images_and_drops_the_unreadable_images_label(classifier, tmp_path,
                                                                                        photo_folder):
    folder = tmp_path / "eval"
    folder.mkdir()
    photos = sorted(photo_folder.iterdir())[:6]
    for photo in photos:
        shutil.copy(photo, folder / photo.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    listed = sorted(folder.iterdir())
    labels = np.arange(len(listed)) % 3
    (tmp_path / "labels.txt").write_text("".join(f"{v}\n" for v in labels) + "\n")
    result = nq_onnx.convert(classifier, tmp_path / "q.onnx", photo_folder, QuantConfig(calib_size=8, **FAST),
                             eval_data=folder, eval_labels=tmp_path / "labels.txt")
    kept = [i for i, f in enumerate(listed) if f.name != "broken.png"]
    images = prepared(classifier, [listed[i] for i in kept])
    expect(outputs(classifier, images), outputs(tmp_path / "q.onnx", images), result.summary.metrics["minmax"],
           labels[kept])
    assert result.summary.evaluation.describe() == f"eval data: 6 images of {folder}; labels: labels.txt (6)"


def test_latency_against_fp32_is_measured_interleaved(classifier, tmp_path, photo_folder):
    result = nq_onnx.convert(classifier, tmp_path / "q.onnx", photo_folder, QuantConfig(calib_size=8, **FAST),
                             measure_latency=True)
    latency = result.summary.latency
    assert latency.batch == 8 and latency.rounds == 20 and latency.threads == 2
    assert latency.fp32_spread_ms[0] <= latency.fp32_ms <= latency.fp32_spread_ms[1]
    assert latency.quantized_spread_ms[0] <= latency.quantized_ms <= latency.quantized_spread_ms[1]
    assert latency.ratio == latency.quantized_ms / latency.fp32_ms > 0
    cpu = cpu_features()
    assert latency.cpu == f"{cpu.model or 'an unnamed CPU'} ({cpu.kind})"
    line = next(x for x in format_summary(result.summary, 1.0, "q").splitlines() if x.startswith("  latency: "))
    assert line == (f"  latency: batch 8: {latency.quantized_ms:.3g} ms against FP32's {latency.fp32_ms:.3g} ms "
                    f"({latency.ratio:.2f}x the time), 20 interleaved rounds, 2 threads, on {latency.cpu}")
    assert "latency_s" in result.summary.timings


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(classifier, tmp_path, calib, error, message, **kwargs):
    """The conversion fails with exactly ``message`` (one line), writes nothing, and leaves its inputs alone."""
    before = {p: digest(p) for p in (classifier, *[v for v in kwargs.values() if isinstance(v, Path) and v.is_file()])}
    with pytest.raises(error) as caught:
        nq_onnx.convert(classifier, tmp_path / "out.onnx", calib, QuantConfig(calib_size=8, **FAST),
                        report=tmp_path / "out.html", **kwargs)
    assert str(caught.value) == message
    assert not list(tmp_path.glob("out.*"))
    assert {p: digest(p) for p in before} == before


def test_a_missing_eval_folder_is_refused(classifier, tmp_path, photo_folder):
    refused(classifier, tmp_path, photo_folder, DataError, f"evaluation data not found: {tmp_path / 'nowhere'}",
            eval_data=tmp_path / "nowhere")


def test_eval_data_of_another_kind_is_refused(classifier, tmp_path, photo_folder):
    (tmp_path / "eval.csv").write_text("1,2\n")
    refused(classifier, tmp_path, photo_folder, DataError,
            f"evaluation data {tmp_path / 'eval.csv'} is neither a folder of images nor an .npy/.npz file",
            eval_data=tmp_path / "eval.csv")


def test_labels_whose_count_does_not_match_are_refused(classifier, tmp_path, photo_folder, class_tree):
    (tmp_path / "labels.txt").write_text("0\n1\n2\n")
    refused(classifier, tmp_path, photo_folder, DataError,
            f"{tmp_path / 'labels.txt'} has 3 labels for the 12 images of {class_tree}",
            eval_data=class_tree, eval_labels=tmp_path / "labels.txt")
    np.save(tmp_path / "labels.npy", np.arange(5))
    np.save(tmp_path / "eval.npy", np.zeros((4, 3, 8, 8), np.float32))
    refused(classifier, tmp_path, photo_folder, DataError,
            f"{tmp_path / 'labels.npy'} has 5 labels for the 4 inputs of {tmp_path / 'eval.npy'}",
            eval_data=tmp_path / "eval.npy", eval_labels=tmp_path / "labels.npy")


def test_labels_that_are_not_class_indices_are_refused(classifier, tmp_path, photo_folder, class_tree):
    (tmp_path / "labels.txt").write_text("0\ncat\n")
    refused(classifier, tmp_path, photo_folder, DataError,
            f"{tmp_path / 'labels.txt'} line 2: 'cat' is not an integer class index",
            eval_data=class_tree, eval_labels=tmp_path / "labels.txt")
    np.save(tmp_path / "labels.npy", np.full(12, -1))
    refused(classifier, tmp_path, photo_folder, DataError,
            f"{tmp_path / 'labels.npy'}: labels must be class indices (0 or more), found -1",
            eval_data=class_tree, eval_labels=tmp_path / "labels.npy")
    refused(classifier, tmp_path, photo_folder, DataError, f"labels file not found: {tmp_path / 'none.txt'}",
            eval_data=class_tree, eval_labels=tmp_path / "none.txt")


def test_labels_without_eval_data_are_refused(classifier, tmp_path, photo_folder):
    """Which held-out calibration images labels would belong to depends on the seed: labels need their images."""
    (tmp_path / "labels.txt").write_text("0\n1\n")
    refused(classifier, tmp_path, photo_folder, DataError,
            "--eval-labels needs --eval DATA: the images or tensors the labels belong to",
            eval_labels=tmp_path / "labels.txt")


def test_eval_data_with_evaluation_off_is_refused(classifier, tmp_path, photo_folder, class_tree):
    refused(classifier, tmp_path, photo_folder, ConfigError, "--eval and --no-eval contradict each other",
            eval_data=class_tree, evaluate=False)


def test_latency_without_inputs_is_refused(classifier, tmp_path, photo_folder):
    plan = tmp_path / "plan" / "plan.json"
    plan.parent.mkdir()
    nq_onnx.convert(classifier, tmp_path / "plan" / "q.onnx", photo_folder, QuantConfig(calib_size=8, **FAST),
                    save_plan=plan, evaluate=False)
    refused(classifier, tmp_path, None, DataError, "--latency needs inputs to time: --calib DATA or --eval DATA",
            load_plan=plan, measure_latency=True)


def test_kernels_verdict_names_why_a_model_does_not_suit_a_target(classifier, tmp_path, photo_folder):
    """The default portable model runs on integer kernels; asked of the gpu target, its uint8 activations break
    TensorRT's Q/DQ rules, and the verdict says no with the first reason."""
    from nq_onnx.evaluation import check_kernels
    from nq_onnx.inspect import inspect_model, target_failures

    result = nq_onnx.convert(classifier, tmp_path / "q.onnx", photo_folder, QuantConfig(calib_size=8, **FAST),
                             evaluate=False, report=tmp_path / "q.html")
    assert result.summary.kernels.describe() == "yes (1/1 quantized matmuls on integer kernels; suits target portable)"
    problems = target_failures(inspect_model(result.model), "gpu")
    assert problems
    kernels = check_kernels(result.model, "gpu")
    assert not kernels.ok and kernels.problems == tuple(problems)
    more = f"; {len(problems) - 1} more" if len(problems) > 1 else ""
    assert kernels.describe() == f"no (1/1 quantized matmuls on integer kernels; target gpu: {problems[0]}{more})"
    assert "  integer kernels: yes (1/1" in format_summary(result.summary, 1.0, "q")


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from nq_onnx.export import export_timm

    path = tmp_path_factory.mktemp("base") / "vit.onnx"
    export_timm("vit_small_patch16_224", path, model_kwargs=dict(img_size=32, depth=2), num_classes=10)
    return path


def _fast(**fields) -> QuantConfig:
    search = nq_onnx.SearchConfig(search_images=2, holdout_images=1, tokens=128, rounds=1, act_alphas=(0.3, 1.0, 8),
                                  weight_alphas=(0.5, 1.0, 6))
    return QuantConfig(calib_size=6, search=search, **fields)


def test_the_summary_measures_the_base_method_on_the_same_inputs(tiny_vit, photo_folder, tmp_path):
    """MinMax's output error (the same widths and quantizers, no rewrite) is measured beside the conversion's, on the
    same held-out images, and equals a MinMax conversion's; within 3 dB of it nothing is warned; the written model is
    the same as without evaluation."""
    result = nq_onnx.convert(tiny_vit, tmp_path / "q.onnx", photo_folder, _fast(w_bits=6, a_bits=6))
    ours, base = result.summary.metrics["noisyquant"], result.summary.base_metrics
    assert base is not None and set(base) >= {"mse", "sqnr_db"}
    assert ours["sqnr_db"] > base["sqnr_db"] - 3.0, (ours["sqnr_db"], base["sqnr_db"])
    assert result.summary.warnings == [] and "base_s" in result.summary.timings
    nq_onnx.convert(tiny_vit, tmp_path / "plain.onnx", photo_folder, _fast(w_bits=6, a_bits=6), evaluate=False)
    assert (tmp_path / "q.onnx").read_bytes() == (tmp_path / "plain.onnx").read_bytes()
    minmax = nq_onnx.convert(tiny_vit, tmp_path / "m.onnx", photo_folder,
                             _fast(method="minmax", w_bits=6, a_bits=6, reparam=False, balance_channels=False))
    assert minmax.summary.base_metrics is None  # MinMax is the base itself
    assert minmax.summary.metrics["minmax"]["sqnr_db"] == pytest.approx(base["sqnr_db"], abs=1e-6)


def test_a_conversion_far_worse_than_the_base_method_is_warned_about(tiny_vit, photo_folder, tmp_path, caplog):
    """A technique that spoils every group's step (64x the searched one) leaves the output far above MinMax's
    error: the summary says so in one line, and the log warns."""
    import dataclasses as dc

    from nq_onnx.core import technique as techniques

    class Spoil(techniques.Technique):
        name = "spoil_steps"

        def enabled(self, config):
            return True

        def plan_group(self, config, group, rows, planned):
            return dc.replace(planned, scale=planned.scale * 64)

    techniques.register(Spoil)
    try:
        result = nq_onnx.convert(tiny_vit, tmp_path / "q.onnx", photo_folder, _fast(method="easyquant"))
    finally:
        techniques.unregister(Spoil.name)
    ours, base = result.summary.metrics["easyquant"], result.summary.base_metrics
    assert ours["sqnr_db"] < base["sqnr_db"] - 3.0
    assert len(result.summary.warnings) == 1 and "far above the base method's" in result.summary.warnings[0]
    assert f"{base['sqnr_db']:.2f} dB" in result.summary.warnings[0]
    text = format_summary(result.summary, 1.0, tmp_path / "q.onnx")
    assert text.splitlines()[-1] == "  " + result.summary.warnings[0]
    assert any("far above the base method's" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
