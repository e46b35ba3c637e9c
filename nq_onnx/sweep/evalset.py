"""Evaluation sets for a sweep, described by value so that any worker can load any shard of them.

An :class:`EvalSet` names its source and the inputs chosen from it; :func:`load_shard` prepares inputs
``start .. stop - 1`` of it. Three sources:

- ``folder``: images, recursively; with ``labelled`` the class is the top sub-folder's index in sorted order;
- ``pixels``: an ``.npz`` whose ``images`` array holds uint8 pictures (N, H, W[, C]), prepared like image files;
- ``tensors``: an ``.npz``/``.npy`` of ready model inputs, as ``convert --calib`` reads them.

Labels come from the class sub-folders or from the ``.npz``'s ``labels`` array. A ``limit`` takes a seeded choice
of that many inputs (seed 0, in source order), so a sorted class tree is sampled across its classes; ``per_class``
takes the first that many inputs of each class instead (a balanced set, the same on every run and machine).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx

from nq_onnx.calibration.data import IMAGE_EXTENSIONS, Preprocess, load_dataset, load_labels, prepare_image
from nq_onnx.core.errors import DataError


@dataclasses.dataclass(frozen=True)
class EvalSet:
    kind: str  # "folder", "pixels" or "tensors"
    path: Path
    indices: tuple[int, ...]  # the chosen inputs of the source, in order
    files: tuple[str, ...] = ()  # folder: every image file of the source, sorted
    labels: tuple[int, ...] | None = None  # one per chosen input
    classes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.indices)

    def shards(self, size: int) -> list[tuple[int, int]]:
        return [(start, min(start + size, len(self))) for start in range(0, len(self), size)]


def open_eval_set(path: Path, model: onnx.ModelProto, limit: int | None, labelled: bool,
                  per_class: int | None = None) -> EvalSet:
    """Describe the evaluation set at ``path`` (checking that it fits the model and, if ``labelled``, has labels);
    ``limit`` or ``per_class`` chooses among its inputs."""
    what = "labelled evaluation set" if labelled else "held-out evaluation set"
    if path.is_dir():
        files, labels, classes = _folder(path, labelled, what)
        kind = "folder"
    elif path.suffix == ".npz" and _has_pixels(path):
        kind, files, classes = "pixels", (), ()
        with np.load(path, allow_pickle=False) as npz:
            count = len(npz["images"])
        labels = _npz_labels(path, count, labelled, what)
    elif path.suffix in (".npz", ".npy"):
        kind, files, classes = "tensors", (), ()
        count = len(load_dataset(path, model, limit=None, seed=0))  # checks the arrays against the model inputs
        labels = _npz_labels(path, count, labelled, what)
    else:
        raise DataError(f"{what} {path} is neither a folder of images nor an .npz/.npy file")
    count = len(files) if kind == "folder" else len(labels) if labels is not None else count
    indices = _choose(count, limit) if per_class is None else first_of_each_class(labels, per_class)
    chosen = None if labels is None else tuple(int(labels[i]) for i in indices)
    return EvalSet(kind, path, indices, tuple(files), chosen, tuple(classes))


def _folder(path: Path, labelled: bool, what: str) -> tuple[list[str], list[int] | None, list[str]]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"{what}: no images in {path}")
    if not labelled:
        return [str(f) for f in files], None, []
    nested = [f for f in files if f.parent != path]
    if len(nested) != len(files):
        raise DataError(f"{what} {path}: images must sit in one sub-folder per class ({files[0].name} does not)")
    classes = sorted({f.relative_to(path).parts[0] for f in files})
    index = {name: i for i, name in enumerate(classes)}
    return [str(f) for f in files], [index[f.relative_to(path).parts[0]] for f in files], classes


def _has_pixels(path: Path) -> bool:
    with np.load(path, allow_pickle=False) as npz:
        if "images" not in npz.files:
            return False
        images = npz["images"]
    return images.dtype == np.uint8 and images.ndim in (3, 4)


def _npz_labels(path: Path, count: int, labelled: bool, what: str) -> np.ndarray | None:
    labels = load_labels(path, count) if path.suffix == ".npz" else None
    if labelled and labels is None:
        raise DataError(f"{what} {path} has no 'labels' array")
    return labels


def _choose(count: int, limit: int | None) -> tuple[int, ...]:
    if limit is None or limit >= count:
        return tuple(range(count))
    return tuple(int(i) for i in np.sort(np.random.default_rng(0).permutation(count)[:limit]))


def first_of_each_class(labels, per_class: int) -> tuple[int, ...]:
    """The first ``per_class`` inputs of every class (all of a smaller class), in source order."""
    labels = np.asarray(labels)
    return tuple(int(i) for i in np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class]
                                                         for c in np.unique(labels)])))


def load_shard(data: EvalSet, pre: Preprocess | None, model: onnx.ModelProto | None, start: int, stop: int
               ) -> dict[str, np.ndarray] | np.ndarray:
    """The prepared inputs ``start .. stop - 1`` (an array for the model's one image input, or arrays by name)."""
    chosen = list(data.indices[start:stop])
    if data.kind == "folder":
        from PIL import Image

        def one(name: str) -> np.ndarray:
            with Image.open(name) as image:
                return prepare_image(image, pre)

        return np.stack([one(data.files[i]) for i in chosen])
    if data.kind == "pixels":
        from PIL import Image

        with np.load(data.path, allow_pickle=False) as npz:
            pixels = npz["images"]  # one read: every access to an npz member decompresses all of it
        return np.stack([prepare_image(Image.fromarray(pixels[i]), pre) for i in chosen])
    dataset = load_dataset(data.path, model, limit=None, seed=0)
    return {name: array[chosen] for name, array in dataset.arrays.items()}
