"""The HTML report: rendered in a real headless browser, and its edge cases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from conftest import image_model, mlp_model, save
from PIL import Image

from nq_onnx.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def mlp(tmp_path):
    rng = np.random.default_rng(0)
    model = save(mlp_model(rng, tokens=6, k=16, hidden=32, out=10), tmp_path / "mlp.onnx")
    x = rng.standard_normal((16, 6, 16)).astype(np.float32)
    x[:, :, 3] *= 8  # an outlier channel
    data = tmp_path / "data.npz"
    np.savez(data, x=x, labels=rng.integers(0, 10, 16))
    return tmp_path, model, data


def browser(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        if os.environ.get("NQ_REQUIRE_BROWSER"):
            pytest.fail("chromium is required (NQ_REQUIRE_BROWSER is set) but not installed")
        pytest.skip("chromium is not installed (.ci/run installs it)")
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    return subprocess.run([CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr",
                           "--v=0", *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_browser(mlp):
    tmp, model, data = mlp
    report, folder = tmp / "report.html", tmp / "figures"
    assert main(["convert", str(model), "-o", str(tmp / "out.onnx"), "--calib", str(data), "-q", "--w-bits", "6",
                 "--a-bits", "6", "--report", str(report), "--report-dir", str(folder)]) == 0
    page = report.read_text()
    assert "http://" not in page and "https://" not in page  # self-contained
    images = page.count("<img ")
    assert images >= 2  # the depth chart and at least the fc2 histograms
    dom = browser(["--dump-dom", report.as_uri()], tmp)
    assert f'data-ready="{images}/{images}"' in dom.stdout, dom.stdout[-500:]
    assert 'id="layers"' in dom.stdout and 'id="summary"' in dom.stdout
    assert dom.stdout.count("<tr>") >= 2 + 1
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    shot = tmp / "shot.png"
    run = browser(["--window-size=1280,2000", f"--screenshot={shot}", report.as_uri()], tmp)
    assert shot.is_file(), run.stderr[-500:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (2000, 1280) and pixels.std() > 10  # not a blank page
    numbers = json.loads((folder / "report.json").read_text())
    assert [r["layer"] for r in numbers["layers"]] == ["mlp.fc1", "mlp.fc2"]
    assert (folder / "reduction.png").is_file() and (folder / "mlp.fc2.png").is_file()
    fc2 = numbers["layers"][1]
    assert fc2["mse_noisyquant"] <= fc2["mse_easyquant"]
    assert fc2["reduction_pct"] == pytest.approx(100 * (1 - fc2["mse_noisyquant"] / fc2["mse_easyquant"]))
    curve = numbers["theorem"]["mlp.fc2"]  # Theorem 1 on the fc2 input: the no-noise point is the plain error
    assert (folder / "theorem.png").is_file() and curve["widths"][0] == 0.0
    assert curve["measured"][0] == pytest.approx(curve["no_noise"]) == pytest.approx(curve["predicted"][0])
    np.testing.assert_allclose(curve["measured"], curve["predicted"], rtol=0.1)  # 32 channels, one noise value each


def test_report_of_one_layer_model_without_labels(tmp_path, photo_folder):
    model = save(image_model(np.random.default_rng(1)), tmp_path / "one.onnx")
    report, folder = tmp_path / "one.html", tmp_path / "one"
    assert main(["convert", str(model), "-o", str(tmp_path / "out.onnx"), "--calib", str(photo_folder), "-q",
                 "--calib-size", "12", "--report", str(report), "--report-dir", str(folder)]) == 0
    numbers = json.loads((folder / "report.json").read_text())
    assert [r["layer"] for r in numbers["layers"]] == ["head"]
    assert "top1" not in numbers["methods"]["noisyquant"]
    assert "<table" in report.read_text()


def test_report_with_excluded_layers(mlp):
    tmp, model, data = mlp
    report, folder = tmp / "excluded.html", tmp / "excluded"
    assert main(["convert", str(model), "-o", str(tmp / "out.onnx"), "--calib", str(data), "-q",
                 "--exclude", "mlp.fc1", "--report", str(report), "--report-dir", str(folder)]) == 0
    numbers = json.loads((folder / "report.json").read_text())
    assert [r["layer"] for r in numbers["layers"]] == ["mlp.fc2"]


def test_report_command_from_saved_plan_with_labels(tmp_path, capsys):
    """The report's top-1 and output error on held-out labelled data equal what onnxruntime gives for the two
    models (labels: the float model's own classes on half the images, so top-1 is neither 0 nor 1 by chance)."""
    import onnxruntime as ort

    tmp, rng = tmp_path, np.random.default_rng(3)
    model = save(image_model(rng), tmp / "classifier.onnx")
    calib, held = tmp / "calib.npz", tmp / "held.npz"
    np.savez(calib, input=rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    images = rng.standard_normal((24, 3, 8, 8)).astype(np.float32)
    run = lambda path: ort.InferenceSession(str(path)).run(None, {"input": images})[0]  # noqa: E731
    fp32 = run(model)
    labels = np.where(np.arange(24) % 2 == 0, fp32.argmax(1), rng.integers(0, 10, 24))
    np.savez(held, input=images, labels=labels)
    plan = tmp / "plan.json"
    assert main(["convert", str(model), "-o", str(tmp / "out.onnx"), "--calib", str(calib), "-q",
                 "--save-plan", str(plan), "--w-bits", "6", "--a-bits", "6"]) == 0
    folder = tmp / "again"
    assert main(["report", str(model), "--plan", str(plan), "-o", str(tmp / "again.html"), "--data", str(held),
                 "--report-dir", str(folder)]) == 0
    numbers = json.loads((folder / "report.json").read_text())["methods"]
    assert set(numbers) == {"fp32", "noisyquant"}
    quantized = run(tmp / "out.onnx")
    assert numbers["fp32"]["top1"] == float(np.mean(fp32.argmax(1) == labels))
    assert numbers["noisyquant"]["top1"] == float(np.mean(quantized.argmax(1) == labels))
    assert numbers["fp32"]["mse"] == 0
    np.testing.assert_allclose(numbers["noisyquant"]["mse"], np.mean((quantized.astype(np.float64) - fp32) ** 2),
                               rtol=1e-5)


def test_report_with_a_plan_from_another_model_is_refused(mlp, capsys):
    tmp, model, data = mlp
    plan = tmp / "plan.json"
    assert main(["convert", str(model), "-o", str(tmp / "out.onnx"), "--calib", str(data), "-q",
                 "--save-plan", str(plan)]) == 0
    other = save(mlp_model(np.random.default_rng(5), tokens=6, k=16, hidden=32, out=10), tmp / "other.onnx")
    capsys.readouterr()
    assert main(["report", str(other), "--plan", str(plan), "-o", str(tmp / "r.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another model" in err[0]
    assert not (tmp / "r.html").exists()
