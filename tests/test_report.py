"""The HTML report: rendered in a real headless browser, and its edge cases."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from conftest import image_model, mlp_model, save
from PIL import Image

import nq_onnx
from nq_onnx.cli import main
from nq_onnx.report.summary import format_summary, verdict

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
    assert 'id="layers"' in dom.stdout and 'id="verdict"' in dom.stdout and 'id="settings"' in dom.stdout
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


# appended to a copy of the page: where its sections sit once laid out, and the text its tables show
LAYOUT = """<script>
window.addEventListener("load", () => {
  const top = id => document.getElementById(id).getBoundingClientRect().top + window.scrollY;
  const cells = id => Array.from(document.querySelectorAll("#" + id + " tbody tr"),
                                 r => Array.from(r.cells, c => c.innerText.trim()));
  document.body.dataset.layout = JSON.stringify({verdict: top("verdict"), settings: top("settings"),
    layers: top("layers"), verdictRows: cells("verdict"), settingsRows: cells("settings")});
});
</script>"""


def laid_out(report, tmp_path) -> dict:
    """The page as chromium shows it: section positions and the verdict's and settings' cells."""
    shown = tmp_path / "shown.html"
    shown.write_text(report.read_text().replace("</body>", LAYOUT + "</body>"))
    dom = browser(["--dump-dom", shown.as_uri()], tmp_path)
    found = re.search(r'data-layout="([^"]*)"', dom.stdout)
    assert found, dom.stdout[-500:]
    return json.loads(html.unescape(found.group(1)))


def test_report_opens_with_the_summarys_verdict_then_the_settings(tmp_path, photo_folder):
    """Held-out images in class sub-folders, latency and the command line: the page shows the verdict above the
    settings above the per-layer table; its rows are the summary's (the output error equal to onnxruntime's on those
    images); the settings list every config field, the versions, the CPU and the command."""
    import onnxruntime as ort

    from nq_onnx.calibration.data import load_dataset

    model = save(image_model(np.random.default_rng(2)), tmp_path / "classifier.onnx")
    tree = tmp_path / "classes"
    for index, name in enumerate(("ant", "bee")):
        (tree / name).mkdir(parents=True)
        for photo in sorted(photo_folder.iterdir())[6 * index: 6 * index + 6]:
            shutil.copy(photo, tree / name / photo.name)
    command = "nq-onnx convert classifier.onnx -o q.onnx --calib photos --eval classes --latency"
    config = nq_onnx.QuantConfig(calib_size=8, w_bits=6, a_bits=6, method="easyquant")
    result = nq_onnx.convert(model, tmp_path / "q.onnx", photo_folder, config, eval_data=tree, measure_latency=True,
                             command=command, report=tmp_path / "report.html")
    layout = laid_out(tmp_path / "report.html", tmp_path)
    assert layout["verdict"] < layout["settings"] < layout["layers"]
    rows = layout["verdictRows"]
    assert rows == [[what, value] for what, value in verdict(result.summary)]
    assert [what for what, _ in rows] == ["output vs FP32", "evaluation set", "top-1", "latency", "integer kernels"]
    printed = format_summary(result.summary, 1.0, "q.onnx").splitlines()
    assert [f"  {what}: {value}" if what != "evaluation set" else f"  {value}" for what, value in rows] == printed[-5:]
    images = next(load_dataset(tree, nq_onnx.io.model_io.load_model(model)[0], limit=None, seed=0).batches(12))["input"]
    run = lambda path: ort.InferenceSession(str(path)).run(None, {"input": images})[0].astype(np.float64)  # noqa: E731
    fp32, quantized = run(model), run(tmp_path / "q.onnx")
    sqnr = 10 * np.log10(np.sum(fp32**2) / np.sum((fp32 - quantized) ** 2))
    assert rows[0][1].startswith(f"SQNR {sqnr:.2f} dB, MSE {np.mean((fp32 - quantized) ** 2):.4g}, ")
    labels = np.repeat([0, 1], 6)
    assert rows[2][1].startswith(f"FP32 {np.mean(fp32.argmax(1) == labels):.2%}, quantized "
                                 f"{np.mean(quantized.argmax(1) == labels):.2%} (")
    assert rows[1][1] == f"eval data: 12 images of {tree}; labels: class sub-folders (2 classes)"
    assert rows[4][1] == "yes (1/1 quantized matmuls on integer kernels; suits target portable)"
    settings = dict(layout["settingsRows"])
    assert settings["method"] == "easyquant" and settings["target"] == "portable" and settings["w_bits"] == "6"
    assert settings["search.search_images"] == "8" and settings["command"] == command
    assert (settings["nq-onnx"], settings["onnxruntime"], settings["numpy"]) == (nq_onnx.__version__,
                                                                                ort.__version__, np.__version__)
    assert settings["CPU"].startswith(nq_onnx.io.cpu.cpu_features().model or "unnamed")
    body = (tmp_path / "report.html").read_text().split("</head>")[1]
    assert "{" not in body.split('id="layers"')[0]  # no JSON dump before the per-layer table


def test_report_command_gives_a_conversions_verdict(tmp_path):
    """``nq-onnx report`` (pipeline.report) on held-out tensors with a labels file and latency: the verdict rows
    are the summary's, the top-1 figures onnxruntime's."""
    import onnxruntime as ort

    rng = np.random.default_rng(4)
    model = save(image_model(rng), tmp_path / "classifier.onnx")
    np.savez(tmp_path / "calib.npz", input=rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    images = rng.standard_normal((20, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "held.npy", images)
    labels = rng.integers(0, 10, 20)
    (tmp_path / "labels.txt").write_text("\n".join(map(str, labels)))
    plan = tmp_path / "plan.json"
    nq_onnx.convert(model, tmp_path / "q.onnx", tmp_path / "calib.npz", nq_onnx.QuantConfig(w_bits=6, a_bits=6),
                    save_plan=plan)
    folder = tmp_path / "numbers"
    result = nq_onnx.pipeline.report(model, plan, tmp_path / "r.html", data=tmp_path / "held.npy",
                                     eval_labels=tmp_path / "labels.txt", measure_latency=True, report_dir=folder)
    numbers = json.loads((folder / "report.json").read_text())
    assert [tuple(r) for r in numbers["verdict"]] == verdict(result.summary)
    assert [r[0] for r in numbers["verdict"]] == ["output vs FP32", "evaluation set", "top-1", "latency",
                                                 "integer kernels"]
    quantized = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, {"input": images})[0]
    assert numbers["methods"]["noisyquant"]["top1"] == np.mean(quantized.argmax(1) == labels)
    assert numbers["evaluation"] == {"kind": "eval", "images": 20, "source": str(tmp_path / "held.npy"),
                                     "tensors": True, "labels": "labels.txt (20)"}
    assert numbers["kernels"]["integer"] == numbers["kernels"]["layers"] == 1
    assert numbers["latency"]["batch"] == 8


def test_report_command_refuses_labels_without_data(tmp_path):
    model = save(image_model(np.random.default_rng(4)), tmp_path / "classifier.onnx")
    np.savez(tmp_path / "calib.npz", input=np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32))
    plan = tmp_path / "plan.json"
    nq_onnx.convert(model, tmp_path / "q.onnx", tmp_path / "calib.npz", save_plan=plan, evaluate=False)
    (tmp_path / "labels.txt").write_text("1\n")
    for kwargs, message in (({"eval_labels": tmp_path / "labels.txt"},
                             "--eval-labels needs --data DATA: the images or tensors the labels belong to"),
                            ({"measure_latency": True}, "--latency needs inputs to time: --data DATA")):
        with pytest.raises(nq_onnx.DataError) as caught:
            nq_onnx.pipeline.report(model, plan, tmp_path / "r.html", **kwargs)
        assert str(caught.value) == message and not (tmp_path / "r.html").exists()
