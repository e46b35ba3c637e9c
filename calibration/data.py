"""Calibration and evaluation inputs: folders of images, or ready tensors in ``.npy``/``.npz``.

Images are read with Pillow (greyscale, palette, CMYK and alpha images are converted to RGB) and prepared
the way the model expects, from the ``nq_onnx.preprocess`` entry that ``nq-onnx export`` writes into the
model's metadata: resize (shorter side to ``size / crop_pct``, then centre crop; or a plain resize to
``size`` for ``crop_mode = "squash"``), scale to [0, 1], normalize with ``mean``/``std``, NCHW float32.
Unreadable files are skipped and counted; a set with nothing readable is an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx

from nq_onnx.core.errors import DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
PREPROCESS_KEY = "nq_onnx.preprocess"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How raw images become model inputs (what timm calls the data config)."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise DataError(f"unknown interpolation {self.interpolation!r}; choose one of {', '.join(_RESAMPLE)}")
        if self.crop_mode not in ("center", "squash"):
            raise DataError(f"unknown crop mode {self.crop_mode!r}; choose center or squash")
        if not 0 < self.crop_pct <= 1:
            raise DataError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if len(self.mean) != self.input_size[0] or len(self.std) != self.input_size[0]:
            raise DataError("mean and std need one value per input channel")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_model(cls, model: onnx.ModelProto, **overrides) -> "Preprocess":
        """From the model's metadata if present, else ImageNet defaults at the model's static input size."""
        meta = {p.key: p.value for p in model.metadata_props}
        values: dict = {}
        if PREPROCESS_KEY in meta:
            try:
                values = json.loads(meta[PREPROCESS_KEY])
            except json.JSONDecodeError:
                raise DataError(f"model metadata {PREPROCESS_KEY} is not valid JSON") from None
        else:
            dims = _static_input_dims(model)
            if dims is not None:
                values["input_size"] = dims
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "input_size" not in values:
            raise DataError("the model input has no static image size; pass --input-size C,H,W")
        for key in ("input_size", "mean", "std"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


def _static_input_dims(model: onnx.ModelProto) -> tuple[int, int, int] | None:
    inputs = _real_inputs(model)
    if len(inputs) != 1:
        return None
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not all(d.HasField("dim_value") for d in dims[1:]):
        return None
    return tuple(int(d.dim_value) for d in dims[1:])  # type: ignore[return-value]


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


try:
    from PIL import Image

    _RESAMPLE = {
        "bicubic": Image.Resampling.BICUBIC,
        "bilinear": Image.Resampling.BILINEAR,
        "nearest": Image.Resampling.NEAREST,
        "lanczos": Image.Resampling.LANCZOS,
    }
except ImportError:  # pragma: no cover - pillow is a hard dependency
    _RESAMPLE = {}


def prepare_image(image: "Image.Image", pre: Preprocess) -> np.ndarray:
    """One PIL image -> CHW float32 model input."""
    channels, height, width = pre.input_size
    image = image.convert("RGB") if channels == 3 else image.convert("L")
    resample = _RESAMPLE[pre.interpolation]
    if pre.crop_mode == "squash":
        image = image.resize((width, height), resample)
    else:
        scale_h, scale_w = math.floor(height / pre.crop_pct), math.floor(width / pre.crop_pct)
        if height == width:
            w0, h0 = image.size
            short = scale_h
            new = (short, int(short * h0 / w0)) if w0 <= h0 else (int(short * w0 / h0), short)
        else:
            new = (scale_w, scale_h)
        image = image.resize(new, resample)
        left = int(round((image.size[0] - width) / 2.0))
        top = int(round((image.size[1] - height) / 2.0))
        image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    array = (array - np.array(pre.mean, np.float32)) / np.array(pre.std, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)


@dataclasses.dataclass
class Dataset:
    """A fixed, ordered set of model inputs that loads lazily, batch by batch."""

    input_names: tuple[str, ...]
    files: Sequence[Path] = ()
    arrays: dict[str, np.ndarray] | None = None
    preprocess: Preprocess | None = None
    skipped: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        if self.arrays is not None:
            return len(next(iter(self.arrays.values())))
        return len(self.files)

    def batches(self, batch_size: int, limit: int | None = None, first: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """The inputs ``first .. limit - 1`` in batches of ``batch_size`` (the last may be smaller)."""
        count = len(self) if limit is None else min(limit, len(self))
        for start in range(first, count, batch_size):
            stop = min(start + batch_size, count)
            if self.arrays is not None:
                yield {k: v[start:stop] for k, v in self.arrays.items()}
            else:
                yield {self.input_names[0]: np.stack([self._load(p) for p in self.files[start:stop]])}

    def head(self, count: int) -> "Dataset":
        if self.arrays is not None:
            return dataclasses.replace(self, arrays={k: v[:count] for k, v in self.arrays.items()})
        return dataclasses.replace(self, files=list(self.files[:count]))

    def _load(self, path: Path) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as image:
            return prepare_image(image, self.preprocess)


def _readable(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:  # Pillow raises many kinds for a broken file
        return False


def load_dataset(
    source: str | Path, model: onnx.ModelProto, *, limit: int | None, seed: int, preprocess: Preprocess | None = None
) -> Dataset:
    """Images from a folder (recursive) or tensors from ``.npy``/``.npz``, checked against the model inputs.

    With more images than ``limit``, a seeded choice of ``limit`` of them is taken (in sorted order).
    """
    source = Path(source)
    inputs = _real_inputs(model)
    names = tuple(i.name for i in inputs)
    if not source.exists():
        raise DataError(f"calibration data not found: {source}")
    if source.is_dir():
        if len(inputs) != 1:
            raise DataError(
                f"an image folder feeds one input, but the model has {len(inputs)} ({', '.join(names)}); "
                "pass an .npz with one array per input"
            )
        return _image_folder(source, names, limit, seed, preprocess or Preprocess.from_model(model))
    if source.suffix in (".npy", ".npz"):
        arrays = _tensor_file(source, names)
        for info in inputs:
            _check_shape(info, arrays[info.name], source)
        if limit is not None:
            arrays = {k: v[:limit] for k, v in arrays.items()}
        return Dataset(names, arrays=arrays)
    raise DataError(f"calibration data {source} is neither a folder of images nor an .npy/.npz file")


def image_files(folder: Path) -> list[Path]:
    """The image files of ``folder`` and its sub-folders, sorted: what a calibration folder offers."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _image_folder(folder: Path, names: tuple[str, ...], limit: int | None, seed: int, pre: Preprocess) -> Dataset:
    files = image_files(folder)
    if not files:
        raise DataError(f"no images in {folder} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    if limit is not None and len(files) > limit:
        order = np.random.default_rng(seed).permutation(len(files))
        candidates = [files[i] for i in order]
    else:
        candidates = files
    chosen, skipped = [], []
    for path in candidates:
        if limit is not None and len(chosen) >= limit:
            break
        (chosen if _readable(path) else skipped).append(path)
    if not chosen:
        raise DataError(f"none of the {len(files)} image files in {folder} could be read")
    return Dataset(names, files=sorted(chosen), preprocess=pre, skipped=[str(p) for p in skipped])


def _tensor_file(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if isinstance(loaded, np.ndarray):
        if len(names) != 1:
            raise DataError(f"{path} holds one array but the model has {len(names)} inputs ({', '.join(names)})")
        arrays = {names[0]: loaded}
    else:
        with loaded:
            files = [f for f in loaded.files if f != "labels"]  # labels ride along for the report
            if all(n in files for n in names):
                arrays = {n: loaded[n] for n in names}
            elif len(files) == 1 and len(names) == 1:
                arrays = {names[0]: loaded[files[0]]}
            else:
                raise DataError(f"{path} has arrays {files}; expected one per model input: {', '.join(names)}")
    for name, array in arrays.items():
        if array.size == 0:
            raise DataError(f"{path}: array for input {name!r} is empty")
        if array.dtype.kind == "f":
            if not np.all(np.isfinite(array)):
                raise DataError(f"{path}: array for input {name!r} contains NaN or Inf")
            arrays[name] = array.astype(np.float32)
    return arrays


def _check_shape(info: onnx.ValueInfoProto, array: np.ndarray, source: Path) -> None:
    dims = info.type.tensor_type.shape.dim
    expected = ["?" if not d.HasField("dim_value") else d.dim_value for d in dims]
    if array.ndim != len(dims) or any(e != "?" and e != s for e, s in zip(expected[1:], array.shape[1:])):
        shown = "x".join(str(e) for e in expected)
        raise DataError(f"{source}: input {info.name!r} has shape {tuple(array.shape)}, the model expects {shown}")


def load_labels(source: str | Path, count: int) -> np.ndarray | None:
    """Integer class labels stored beside the tensors (``labels`` in an ``.npz``), if any."""
    source = Path(source)
    if source.suffix != ".npz":
        return None
    with np.load(source, allow_pickle=False) as npz:
        if "labels" not in npz.files:
            return None
        labels = npz["labels"]
    if labels.ndim != 1 or len(labels) < count or labels.dtype.kind not in "iu":
        raise DataError(f"{source}: 'labels' must be a 1-D integer array with one label per input")
    return labels[:count].astype(np.int64)


def held_out_dataset(source: str | Path, calib: Dataset, *, count: int, limit: int, seed: int) -> Dataset | None:
    """Up to ``count`` inputs of ``source`` outside ``calib``, the set :func:`load_dataset` chose from it with
    ``limit`` and ``seed``; ``None`` when every input went to ``calib``.

    For a folder these are the next readable images of the same seeded order (in sorted order), for tensors the rows
    after the first ``limit``: ``calib`` itself is left as it is, so the inputs a conversion calibrates and
    searches on do not depend on whether anything is held out."""
    source = Path(source)
    if calib.arrays is not None:
        arrays = _tensor_file(source, calib.input_names)
        rows = {k: v[limit: limit + count] for k, v in arrays.items()}
        return Dataset(calib.input_names, arrays=rows) if len(next(iter(rows.values()))) else None
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if len(files) <= limit:  # load_dataset took every readable file
        return None
    taken = set(calib.files) | {Path(p) for p in calib.skipped}
    chosen: list[Path] = []
    for index in np.random.default_rng(seed).permutation(len(files)):
        if len(chosen) >= count:
            break
        path = files[index]
        if path not in taken and _readable(path):
            chosen.append(path)
    if not chosen:
        return None
    return Dataset(calib.input_names, files=sorted(chosen), preprocess=calib.preprocess)


def class_folder_labels(folder: str | Path, files: Sequence[Path]) -> tuple[np.ndarray, tuple[str, ...]] | None:
    """Labels from a class-folder layout: every image in a sub-folder of ``folder`` (at any depth below it), at least
    two sub-folders, the class of an image the index of its top sub-folder in sorted order (torchvision's
    ``ImageFolder``); ``None`` for any other layout."""
    folder = Path(folder)
    tops = [Path(f).relative_to(folder).parts for f in files]
    if not tops or any(len(parts) < 2 for parts in tops):
        return None
    classes = tuple(sorted({parts[0] for parts in tops}))
    if len(classes) < 2:
        return None
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[parts[0]] for parts in tops], np.int64), classes


def read_labels_file(path: str | Path) -> np.ndarray:
    """Integer class labels from a file: ``.npy`` (a 1-D integer array), ``.npz`` (its ``labels`` array) or text
    (one integer per line; blank lines are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labels file not found: {path}")
    if path.suffix in (".npy", ".npz"):
        try:
            loaded = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"cannot read {path}: {exc}") from None
        if not isinstance(loaded, np.ndarray):
            with loaded:
                if "labels" not in loaded.files:
                    raise DataError(f"{path} has no 'labels' array")
                loaded = loaded["labels"]
        if loaded.ndim != 1 or loaded.dtype.kind not in "iu":
            raise DataError(f"{path}: labels must be a 1-D integer array")
        labels = loaded.astype(np.int64)
    else:
        labels = _text_labels(path)
    if len(labels) and labels.min() < 0:
        raise DataError(f"{path}: labels must be class indices (0 or more), found {int(labels.min())}")
    return labels


def _text_labels(path: Path) -> np.ndarray:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    values = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            values.append(int(line.strip()))
        except ValueError:
            raise DataError(f"{path} line {number}: {line.strip()!r} is not an integer class index") from None
    return np.array(values, np.int64)
