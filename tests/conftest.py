"""Shared builders for tiny hand-written graphs and small real inputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def make_model(nodes, inputs, outputs, initializers=(), opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def tensor(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def init(name: str, values: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def real_attention() -> tuple[np.ndarray, np.ndarray]:
    """``(A, V)`` of the first attention ``A @ V`` of the demo's ViT-S/14 (real weights) on two crops of a
    photograph: real attention probabilities and the values they weigh."""
    from nq_onnx.calibration.data import Preprocess
    from nq_onnx.calibration.runtime import session, with_outputs
    from nq_onnx.demo import crops, demo_model_path, demo_photos
    from nq_onnx.io.model_io import load_model

    model = load_model(demo_model_path())[0]
    attn = next(n for n in model.graph.node if n.op_type == "MatMul" and any(
        p.op_type == "Softmax" and p.output[0] == n.input[0] for p in model.graph.node))
    pre = Preprocess.from_model(model, crop_pct=1.0)
    feeds = {model.graph.input[0].name: crops(demo_photos()[:1], pre, 0)[:2]}
    a, v = session(with_outputs(model, list(attn.input))).run(list(attn.input), feeds)
    return a, v


def mlp_model(rng: np.random.Generator, tokens: int = 5, k: int = 12, hidden: int = 20, out: int = 7,
              second_bias: bool = True) -> onnx.ModelProto:
    """``x -> fc1 (MatMul + Add) -> Relu -> fc2 (MatMul [+ Add])``, timm's export layout, named like timm."""
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.w"], ["h0"], name="/mlp/fc1/MatMul"),
        helper.make_node("Add", ["fc1.b", "h0"], ["h1"], name="/mlp/fc1/Add"),
        helper.make_node("Relu", ["h1"], ["h2"], name="/mlp/act/Relu"),
        helper.make_node("MatMul", ["h2", "fc2.w"], ["y0" if second_bias else "y"], name="/mlp/fc2/MatMul"),
    ]
    inits = [init("fc1.w", rng.standard_normal((k, hidden)) / np.sqrt(k)), init("fc1.b", rng.standard_normal(hidden)),
             init("fc2.w", rng.standard_normal((hidden, out)) / np.sqrt(hidden))]
    if second_bias:
        nodes.append(helper.make_node("Add", ["y0", "fc2.b"], ["y"], name="/mlp/fc2/Add"))
        inits.append(init("fc2.b", rng.standard_normal(out)))
    return make_model(nodes, [tensor("x", ["batch", tokens, k])], [tensor("y", ["batch", tokens, out])], inits)


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> Path:
    """A folder of real photographs (scikit-image's sample images; no download)."""
    import skimage.data

    source = Path(skimage.data.__file__).parent
    folder = tmp_path_factory.mktemp("photos")
    names = ["astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "motorcycle_left.png",
             "rocket.jpg", "retina.jpg", "brick.png", "grass.png", "gravel.png", "text.png", "ihc.png", "moon.png",
             "cell.png", "page.png"]
    for name in names:
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    assert len(list(folder.iterdir())) >= 12
    return folder


def image_model(rng: np.random.Generator, size: int = 8, classes: int = 10) -> onnx.ModelProto:
    """A tiny image classifier ``Flatten -> Gemm(transB=1)`` with a static 3 x size x size input."""
    features = 3 * size * size
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], name="/flatten/Flatten", axis=1),
             helper.make_node("Gemm", ["flat", "head.w", "head.b"], ["logits"], name="/head/Gemm", transB=1)]
    inits = [init("head.w", rng.standard_normal((classes, features)) / np.sqrt(features)),
             init("head.b", rng.standard_normal(classes))]
    return make_model(nodes, [tensor("input", ["batch", 3, size, size])], [tensor("logits", ["batch", classes])], inits)


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def work(tmp_path):
    """``(folder, model, calib)``: the small MLP model and an ``.npy`` of 8 calibration inputs, in ``tmp_path``."""
    rng = np.random.default_rng(0)
    model = save(mlp_model(rng), tmp_path / "mlp.onnx")
    calib = tmp_path / "calib.npy"
    np.save(calib, rng.standard_normal((8, 5, 12)).astype(np.float32))
    return tmp_path, model, calib
