"""Refactors change no numbers: small conversions reproduce stored digests of their output model and plan.

Every setting below was converted once before a refactor began and the SHA-256 of the emitted model, the plan's
JSON and its arrays stored in ``tests/golden/digests.json``, keyed by CPU kind (:func:`nq_onnx.io.cpu.cpu_features`)
and numpy's BLAS kernels (threadpoolctl): the search is float maths on numpy's BLAS, whose kernels (and so the last
bits of a sum) differ between CPUs and settings (``OPENBLAS_CORETYPE`` picks another core's kernels), so the same
model, data and seed give the same bytes with the same kernels on the same kind of CPU, not everywhere. Where no
digests are stored for both the test is skipped.

Each setting names every option of :class:`~nq_onnx.QuantConfig` and :class:`~nq_onnx.SearchConfig` (the
test below checks it), so a default that moves changes no setting. There is one setting per technique: each
turns one technique on over the paper's setting (``PAPER``); ``DEFAULTS`` holds the defaults the digests were
recorded with, every technique they turn on.

To record another CPU kind or BLAS kernel, on a commit whose conversions are trusted (main, before a change)::

    NQ_WRITE_GOLDEN=1 python -m pytest -q tests/test_golden.py                           # numpy's own kernels
    OPENBLAS_CORETYPE=Haswell NQ_WRITE_GOLDEN=1 python -m pytest -q tests/test_golden.py # another OpenBLAS core

(``python -c "import numpy; numpy.show_runtime()"`` names the kernel numpy runs), then run the test twice more
without ``NQ_WRITE_GOLDEN`` under each kernel: a digest that does not reproduce is not worth keeping. Recording
writes only the current key; add ``-k NAME`` to record a new setting without rewriting the others.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest

from nq_onnx import QuantConfig, SearchConfig, convert
from nq_onnx.io.cpu import cpu_features, numpy_blas
from nq_onnx.export import export_timm

GOLDEN = Path(__file__).parent / "golden" / "digests.json"
# the search's grids and samples, small enough for a conversion in seconds
SEARCH = dict(act_alphas=(0.3, 1.0, 36), weight_alphas=(0.5, 1.0, 26), rounds=2,
              noise_amplitudes=(0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0), noise_shifts=(0.0, 0.5, 1.0),
              shift_min_rows=16, tokens=64, read_token_share=0.5, screen_tokens=256, screen_keep=3, search_images=4,
              holdout_images=2, sequential=True, grid_stride=1, objective="cosine", ranking_loss=0.0,
              ranking_margin=0.2, ranking_pairs=16)
# the paper's setting: NoisyQuant, symmetric activations, A V quantized, no reparameterization, nearest rounding
PAPER = dict(method="noisyquant", w_bits=8, a_bits=8, seed=0, calib_size=8, batch_size=8, exclude=(),
             quantize_attention_matmuls=True, attention_probabilities=True, int16_bias=False, target="portable",
             weight_dtype="auto", activations="symmetric", noise="paper+shift", reparam=False,
             reparam_attention=False, weight_rounding="nearest", bias_correction=False, bits_budget=None,
             mixed_sensitivity="output", mixed_images=4, balance_channels=False, balance_alpha=0.25)
# the portable target's fast model: asymmetric activations, LayerNorm reparam, channel balancing, GPTQ, bias
# correction, W8A8 with int8-paired weights, A V float
DEFAULTS = dict(PAPER, weight_dtype="int8-paired", attention_probabilities=False, activations="asymmetric",
                reparam=True, weight_rounding="gptq", bias_correction=True, balance_channels=True)
UNBALANCED = dict(DEFAULTS, balance_channels=False)  # the defaults before channel balancing
W6A6 = dict(PAPER, w_bits=6, a_bits=6)
MIXED = dict(PAPER, bits_budget=6.0, mixed_images=2)  # a budget chooses every width: w-bits and a-bits stay 8
SETTINGS = {
    "minmax_w8a8": dict(PAPER, method="minmax"),
    "easyquant_w8a8": dict(PAPER, method="easyquant"),
    "noisyquant_w6a6": W6A6,
    "noisyquant_paper_w6a6": dict(W6A6, noise="paper"),
    "noisyquant_w4a8_vnni": dict(PAPER, w_bits=4, target="x86-vnni", weight_dtype="int8"),
    "noisyquant_int16_bias": dict(PAPER, int16_bias=True),
    "default_portable": DEFAULTS,
    "default_portable_unbalanced": UNBALANCED,
    "portable_w7_auto": dict(UNBALANCED, w_bits=7, weight_dtype="auto"),  # 7-bit codes, which pair safely anyhow
    "default_x86_vnni_w6a6": dict(UNBALANCED, target="x86-vnni", weight_dtype="int8", w_bits=6, a_bits=6),
    "reparam_layernorm_w6a6": dict(W6A6, reparam=True),
    "reparam_attention_w6a6": dict(W6A6, reparam_attention=True),
    "balance_channels_w6a6": dict(W6A6, balance_channels=True),
    "gptq_w6a6": dict(W6A6, weight_rounding="gptq"),
    "gptq_act_w6a6": dict(W6A6, weight_rounding="gptq-act"),
    "bias_correction_w6a6": dict(W6A6, bias_correction=True),
    "ptq4vit_twin_w6a6": dict(W6A6, method="ptq4vit"),
    "noisyquant_ptq4vit_twin_w6a6": dict(W6A6, method="noisyquant-ptq4vit"),
    "mixed_budget6_output": dict(MIXED, mixed_sensitivity="output"),
    "mixed_budget6_joint": dict(MIXED, mixed_sensitivity="joint"),
    "mixed_budget6_nuclear": dict(MIXED, mixed_sensitivity="nuclear"),
    # a search per width before the mixed one: coarser grids and one round keep it to seconds
    "mixed_budget6_searched": dict(MIXED, mixed_sensitivity="searched",
                                   search=dict(rounds=1, act_alphas=(0.3, 1.0, 12), weight_alphas=(0.5, 1.0, 9))),
}


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    path = tmp_path_factory.mktemp("golden") / "vit.onnx"
    export_timm("vit_small_patch16_224", path, model_kwargs=dict(img_size=32, depth=2), num_classes=10)
    return path


def numerics() -> str:
    """What decides the bytes besides the inputs: the CPU kind and the BLAS kernels numpy runs."""
    from threadpoolctl import threadpool_info

    blas = numpy_blas(threadpool_info())
    kernels = f"{blas['internal_api']} {blas['architecture']}" if blas else "no BLAS found"
    return f"{cpu_features().kind}, {kernels}"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digests(model: Path, photos: Path, out: Path, setting: dict) -> dict[str, str]:
    """The SHA-256 of the model, the plan's JSON and its arrays converted under ``setting`` (its ``search``: what it
    changes of :data:`SEARCH`)."""
    setting = dict(setting)
    config = QuantConfig(search=SearchConfig(**SEARCH | setting.pop("search", {})), **setting)
    convert(model, out / "q.onnx", photos, config, save_plan=out / "plan.json", evaluate=False)
    return {"model": sha(out / "q.onnx"), "plan": sha(out / "plan.json"), "arrays": sha(out / "plan.npz")}


def test_every_setting_names_every_option():
    """A setting that left an option to its default would change its bytes when that default moves."""
    options = {f.name for f in dataclasses.fields(QuantConfig)} - {"search", "techniques"}  # techniques: none is on
    unnamed = {name: sorted(options - set(setting)) for name, setting in SETTINGS.items() if options - set(setting)}
    assert not unnamed, f"settings leaving options to their defaults: {unnamed}"
    assert set(SEARCH) == {f.name for f in dataclasses.fields(SearchConfig)}


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
