"""timm families beyond ViT/DeiT/Swin, exported by us with random weights at small sizes, then converted.

Floors are the logits SQNR of W8A8 NoisyQuant on real photographs, set about 6 dB under what was measured
(the weights come from the export seed; measured, dB: BEiT 33.5, CaiT 43.8, DeiT-III 42.9, EVA 34.7, PiT 26.5,
XCiT 37.7, hybrid ViT 29.6).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import nq_onnx
from nq_onnx import QuantConfig, SearchConfig
from nq_onnx.core import quant
from nq_onnx.calibration.data import load_dataset
from nq_onnx.export import export_timm
from nq_onnx.inspect import inspect_model
from nq_onnx.io.model_io import load_model

FAMILIES = {
    "beit": ("beit_base_patch16_224", dict(img_size=64, depth=2, embed_dim=64, num_heads=2), 27.0),
    "cait": ("cait_xxs24_224", dict(img_size=64, depth=2, embed_dim=64, num_heads=2), 37.0),
    "deit3": ("deit3_small_patch16_224", dict(img_size=64, depth=2), 36.0),
    "eva": ("eva02_tiny_patch14_224", dict(img_size=56, depth=2), 28.0),
    "pit": ("pit_ti_224", dict(img_size=64), 20.0),
    "xcit": ("xcit_nano_12_p16_224", dict(img_size=64, depth=2), 31.0),
    "hybrid_vit": ("vit_small_r26_s32_224", dict(img_size=64, depth=2), 23.0),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_exports_and_converts(family, tmp_path, photo_folder):
    name, kwargs, floor = FAMILIES[family]
    path = tmp_path / f"{family}.onnx"
    exported = export_timm(name, path, model_kwargs=kwargs, num_classes=10, check_images=photo_folder)
    assert exported.max_abs_diff < 1e-4
    out = tmp_path / f"{family}.nq.onnx"
    result = nq_onnx.convert(path, out, photo_folder, QuantConfig(calib_size=8, search=SearchConfig(search_images=4)))
    assert any(s.kind == "act_matmul" for s in result.layers.layers)
    model, _ = load_model(path)
    feeds = next(load_dataset(photo_folder, model, limit=16, seed=2).batches(16))
    want = ort.InferenceSession(str(path)).run(None, feeds)[0]
    got = ort.InferenceSession(str(out)).run(None, feeds)[0]
    assert quant.sqnr_db(want, got) > floor
    inspection = inspect_model(onnx.load(str(out)))
    assert all(k.integer for k in inspection.weight_layers), [k for k in inspection.weight_layers if not k.integer]
    assert np.isfinite(got).all()
