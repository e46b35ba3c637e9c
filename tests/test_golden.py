"""Refactors change no numbers: small conversions reproduce stored digests of their output model and plan.

Every setting below was converted once before a refactor began and the SHA-256 of the emitted model, the plan's
JSON and its arrays stored in ``tests/golden/digests.json``, keyed by CPU kind (:func:`nq_onnx.cpu.cpu_features`)
and numpy's BLAS kernels (threadpoolctl): the search is float maths on numpy's BLAS, whose kernels (and so the last
bits of a sum) differ between CPUs and settings (``OPENBLAS_CORETYPE`` picks another core's kernels), so the same
model, data and seed give the same bytes with the same kernels on the same kind of CPU, not everywhere. Where no
digests are stored for both the test is skipped; ``NQ_WRITE_GOLDEN=1`` records them (do that on main, before a
change).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from nq_onnx import QuantConfig, SearchConfig, convert
from nq_onnx.cpu import cpu_features
from nq_onnx.export import export_timm

GOLDEN = Path(__file__).parent / "golden" / "digests.json"
# the settings these digests were recorded with, before the defaults moved to the portable fast model
SYMMETRIC = dict(activations="symmetric", w_bits=8, attention_probabilities=True, reparam=False,
                 weight_rounding="nearest", bias_correction=False)
SETTINGS = {
    "minmax_w8a8": dict(SYMMETRIC, method="minmax"),
    "easyquant_w8a8": dict(SYMMETRIC, method="easyquant"),
    "noisyquant_w6a6": dict(SYMMETRIC, method="noisyquant", w_bits=6, a_bits=6),
    "noisyquant_paper_w6a6": dict(SYMMETRIC, method="noisyquant", w_bits=6, a_bits=6, noise="paper"),
    "noisyquant_w4a8_vnni": dict(SYMMETRIC, method="noisyquant", w_bits=4, target="x86-vnni"),
    "noisyquant_int16_bias": dict(SYMMETRIC, method="noisyquant", int16_bias=True),
    "default_portable": dict(),  # the defaults: asymmetric activations, reparam, GPTQ, bias correction, W7A8
    "default_x86_vnni_w6a6": dict(target="x86-vnni", w_bits=6, a_bits=6),
}


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    path = tmp_path_factory.mktemp("golden") / "vit.onnx"
    export_timm("vit_small_patch16_224", path, model_kwargs=dict(img_size=32, depth=2), num_classes=10)
    return path


def numerics() -> str:
    """What decides the bytes besides the inputs: the CPU kind and the BLAS kernels numpy runs."""
    from threadpoolctl import threadpool_info

    blas = next((i for i in threadpool_info() if i.get("user_api") == "blas"), None)
    kernels = f"{blas['internal_api']} {blas['architecture']}" if blas else "no BLAS found"
    return f"{cpu_features().kind}, {kernels}"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digests(model: Path, photos: Path, out: Path, setting: dict) -> dict[str, str]:
    search = SearchConfig(search_images=4, holdout_images=2, shift_min_rows=16, tokens=64)
    config = QuantConfig(calib_size=8, search=search, **setting)
    convert(model, out / "q.onnx", photos, config, save_plan=out / "plan.json", evaluate=False)
    return {"model": sha(out / "q.onnx"), "plan": sha(out / "plan.json"), "arrays": sha(out / "plan.npz")}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_conversion_reproduces_stored_digests(name, tiny_vit, photo_folder, tmp_path):
    kind = numerics()
    stored = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    got = digests(tiny_vit, photo_folder, tmp_path, SETTINGS[name])
    if os.environ.get("NQ_WRITE_GOLDEN"):
        stored.setdefault(kind, {})[name] = got
        GOLDEN.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
    if name not in stored.get(kind, {}):
        pytest.skip(f"no stored digests for {name} on {kind}")
    assert got == stored[kind][name]
