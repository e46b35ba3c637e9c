"""``nq-onnx export``: a timm model to ONNX, with its preprocessing recorded in the metadata.

Needs torch and timm (the ``export`` extra); nothing else in nq-onnx does. The exported graph has a dynamic
batch axis and is checked against PyTorch before it is written: on real images prepared with the recorded
preprocessing when ``check_images`` names a folder of them, else on random inputs.
"""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx

from nq_onnx.calibration.data import PREPROCESS_KEY, Preprocess
from nq_onnx.core.errors import ModelError, NQError
from nq_onnx.calibration.runtime import session as runtime_session
from nq_onnx.io.model_io import check_output_path, load_model, save_model_atomic
from nq_onnx.models.registry import recipe_for


@dataclasses.dataclass(frozen=True)
class ExportResult:
    path: Path
    preprocess: Preprocess
    max_abs_diff: float
    family: str


def _import_torch():
    try:
        import timm
        import torch
    except ImportError as exc:
        raise NQError(f"export needs torch and timm ({exc.name} is missing): pip install 'nq-onnx[export]'") from None
    return torch, timm


def _real_images(folder: Path, pre: Preprocess, count: int = 8) -> np.ndarray:
    from nq_onnx.calibration.data import IMAGE_EXTENSIONS, prepare_image
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:count]
    if not files:
        raise NQError(f"no images to check the export on in {folder}")
    arrays = []
    for path in files:
        with Image.open(path) as image:
            arrays.append(prepare_image(image, pre))
    return np.stack(arrays)


def export_timm(
    model_name: str,
    output: str | Path,
    *,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    opset: int = 17,
    force: bool = False,
    model_kwargs: dict | None = None,
    seed: int = 0,
    check_images: str | Path | None = None,
    external_data: bool | None = None,
) -> ExportResult:
    """Export a timm model; ``external_data`` as in :func:`nq_onnx.convert` (by default: over 2 GiB)."""
    torch, timm = _import_torch()
    output = check_output_path(output, force=force, inputs=(checkpoint,) if checkpoint else ())
    if not 13 <= opset <= 21:
        raise NQError(f"opset must be between 13 and 21, got {opset}")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ModelError(f"checkpoint not found: {checkpoint}")
    kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None:
        kwargs["img_size"] = img_size
    if model_name not in timm.list_models() and model_name not in timm.list_models(pretrained=True):
        raise ModelError(f"unknown timm model {model_name!r}")
    torch.manual_seed(seed)  # random initial weights (no checkpoint) and the example input, both from the seed
    recipe = recipe_for(model_name)
    try:
        model = recipe.build(timm, model_name, pretrained, str(checkpoint or ""), **kwargs)
    except (RuntimeError, OSError, ValueError, TypeError) as exc:
        raise ModelError(f"cannot build {model_name}: {str(exc).splitlines()[0]}") from None
    pre = recipe.preprocess(model, timm)
    example = torch.randn(2, *pre.input_size)
    with tempfile.TemporaryDirectory(prefix="nq-export-") as folder:  # torch writes external data beside a path
        traced = Path(folder) / "model.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            expected = model(example).numpy()
            recipe.export(torch, model, example, traced, opset)
        proto, _ = load_model(traced)  # a model over 2 GiB stays in torch's files until written below
        return _finish(model, model_name, proto, pre, example, expected, check_images, output, external_data)


def _finish(model, model_name, proto, pre, example, expected, check_images, output, external_data) -> ExportResult:
    """Record the preprocessing, compare onnxruntime with torch, write the model."""
    import timm
    import torch

    onnx.helper.set_model_props(
        proto,
        {
            **{p.key: p.value for p in proto.metadata_props},  # including where torch's external data is
            PREPROCESS_KEY: pre.to_json(),
            "nq_onnx.source": f"timm:{model_name}",
            "nq_onnx.timm_version": timm.__version__,
        },
    )
    session = runtime_session(proto, optimize=False)
    check = example.numpy()
    if check_images is not None:
        check = _real_images(Path(check_images), pre)
        with torch.no_grad():
            expected = model(torch.from_numpy(check)).numpy()
    got = session.run(None, {"input": check})[0]
    diff = float(np.max(np.abs(got - expected)))
    save_model_atomic(proto, output, external=external_data)
    return ExportResult(output, pre, diff, recipe_for(model_name).family)
