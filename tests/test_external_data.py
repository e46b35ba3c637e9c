"""Models with ONNX external data: in and out, never loaded twice, written atomically, and over 2 GiB."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import init, make_model, tensor
from onnx import TensorProto, helper, numpy_helper

import nq_onnx
from nq_onnx import QuantConfig
from nq_onnx.core import external_data
from nq_onnx.cli import main
from nq_onnx.io.model_io import load_model


def embedding_model(rng, vocab=1024, k=128, hidden=256, out=64) -> onnx.ModelProto:
    """``ids -> Gather(table) -> fc1 -> Relu -> fc2``: a float table no pass needs, and two Linears."""
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="/embed/Gather"),
        helper.make_node("MatMul", ["e", "fc1.w"], ["h0"], name="/fc1/MatMul"),
        helper.make_node("Add", ["h0", "fc1.b"], ["h1"], name="/fc1/Add"),
        helper.make_node("Relu", ["h1"], ["h2"], name="/act/Relu"),
        helper.make_node("MatMul", ["h2", "fc2.w"], ["y0"], name="/fc2/MatMul"),
        helper.make_node("Add", ["y0", "fc2.b"], ["y"], name="/fc2/Add"),
    ]
    inits = [init("table", rng.standard_normal((vocab, k))),
             init("fc1.w", rng.standard_normal((k, hidden)) / np.sqrt(k)), init("fc1.b", rng.standard_normal(hidden)),
             init("fc2.w", rng.standard_normal((hidden, out)) / np.sqrt(hidden)),
             init("fc2.b", rng.standard_normal(out))]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 6])
    return make_model(nodes, [ids], [tensor("y", ["batch", 6, out])], inits)


def save_external(model: onnx.ModelProto, path: Path) -> Path:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), save_as_external_data=True, location=f"{path.name}.data", size_threshold=0)
    return path


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def outputs(path: Path, feeds) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.fixture
def pair(tmp_path):
    """The same model as one file (``inline/m.onnx``) and with external data (``external/m.onnx`` + data)."""
    model = embedding_model(np.random.default_rng(0))
    (tmp_path / "inline").mkdir()
    (tmp_path / "external").mkdir()
    (tmp_path / "inline" / "m.onnx").write_bytes(model.SerializeToString())
    save_external(model, tmp_path / "external" / "m.onnx")
    ids = np.random.default_rng(1).integers(0, 1024, (24, 6)).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    return tmp_path


def test_external_data_in_and_out_matches_the_one_file_conversion(pair, monkeypatch):
    source = pair / "external"
    before = digests(source)
    model, _ = load_model(source / "m.onnx")
    kept = sorted(t.name for t in model.graph.initializer if external_data.is_external(t))
    assert kept == ["fc1.w", "fc2.w", "table"]  # 64 KiB and more stay on disk; the biases were read in
    read: list[str] = []
    original = external_data.array
    monkeypatch.setattr(external_data, "array", lambda t, folder: read.append(t.name) or original(t, folder))
    config = QuantConfig(w_bits=6, a_bits=6, calib_size=24)
    nq_onnx.convert(source / "m.onnx", pair / "ext.onnx", pair / "ids.npy", config, evaluate=False)
    nq_onnx.convert(pair / "inline" / "m.onnx", pair / "one.onnx", pair / "ids.npy", config, evaluate=False)
    assert "table" not in read and "fc1.w" in read  # the float table is never read by nq-onnx, only streamed
    assert digests(source) == before  # the input model and its data are only read
    data = sorted(p.name for p in pair.glob("ext.onnx.*.data"))
    assert len(data) == 1 and not list(pair.glob("one.onnx.*"))
    ext = onnx.load(str(pair / "ext.onnx"))  # with its data
    one = onnx.load(str(pair / "one.onnx"))
    assert {p.key for p in ext.metadata_props} == {p.key for p in one.metadata_props}
    assert external_data.DIR_KEY not in {p.key for p in ext.metadata_props}  # no absolute path leaks out
    values = lambda m: {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}  # noqa: E731
    ve, vo = values(ext), values(one)
    assert ve.keys() == vo.keys() and all(np.array_equal(ve[k], vo[k]) for k in vo)
    light = onnx.load(str(pair / "ext.onnx"), load_external_data=False)
    assert {t.name for t in light.graph.initializer if external_data.is_external(t)} >= {"table"}
    assert all(int(dict((e.key, e.value) for e in t.external_data)["offset"]) % external_data.ALIGN == 0
               for t in light.graph.initializer if external_data.is_external(t))
    feeds = {"ids": np.load(pair / "ids.npy")[:4]}
    np.testing.assert_array_equal(outputs(pair / "ext.onnx", feeds), outputs(pair / "one.onnx", feeds))


def test_external_writes_are_deterministic_and_replace_the_previous_output_atomically(pair, monkeypatch):
    source, calib = pair / "external" / "m.onnx", pair / "ids.npy"
    for name in ("a.onnx", "b.onnx"):
        nq_onnx.convert(source, pair / name, calib, QuantConfig(calib_size=24), evaluate=False)
    (da,), (db,) = pair.glob("a.onnx.*.data"), pair.glob("b.onnx.*.data")
    assert da.read_bytes() == db.read_bytes() and da.name[len("a.onnx"):] == db.name[len("b.onnx"):]
    assert (pair / "a.onnx").read_bytes() == (pair / "b.onnx").read_bytes().replace(b"b.onnx.", b"a.onnx.")
    # a new conversion replaces the model and removes the data file only the old model used
    nq_onnx.convert(source, pair / "a.onnx", calib, QuantConfig(calib_size=24, w_bits=6, a_bits=6), evaluate=False,
                    force=True)
    (new,) = pair.glob("a.onnx.*.data")
    assert new != da and onnx.load(str(pair / "a.onnx")) is not None
    previous = digests(pair)
    feeds = {"ids": np.load(calib)[:4]}
    expected = outputs(pair / "a.onnx", feeds)
    replace = os.replace

    def interrupted(src, dst):  # the data file gets its new name; the model file never replaces the old one
        if str(dst).endswith(".onnx"):
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        nq_onnx.convert(source, pair / "a.onnx", calib, QuantConfig(calib_size=24, method="minmax"), evaluate=False,
                        force=True)
    monkeypatch.undo()
    assert digests(pair) == previous  # no partial file, no orphan data file, the old pair untouched
    np.testing.assert_array_equal(outputs(pair / "a.onnx", feeds), expected)


def test_external_data_flag_both_ways(pair):
    calib = pair / "ids.npy"
    args = ["--calib", str(calib), "-q", "--no-eval", "--calib-size", "24"]
    assert main(["convert", str(pair / "inline" / "m.onnx"), "-o", str(pair / "x.onnx"), "--external-data", "yes",
                 *args]) == 0
    assert len(list(pair.glob("x.onnx.*.data"))) == 1
    assert main(["convert", str(pair / "external" / "m.onnx"), "-o", str(pair / "y.onnx"), "--external-data", "no",
                 *args]) == 0
    assert not list(pair.glob("y.onnx.*")) and not external_data.has_external(onnx.load(str(pair / "y.onnx")))
    feeds = {"ids": np.load(calib)[:4]}
    np.testing.assert_array_equal(outputs(pair / "x.onnx", feeds), outputs(pair / "y.onnx", feeds))


def test_unknown_external_data_value_is_one_line_error(pair, capsys):
    before = digests(pair / "external")
    code = main(["convert", str(pair / "external" / "m.onnx"), "-o", str(pair / "z.onnx"), "--calib",
                 str(pair / "ids.npy"), "--external-data", "maybe"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--external-data" in err and "maybe" in err
    assert digests(pair / "external") == before and not list(pair.glob("z.onnx*"))


@pytest.mark.parametrize("damage, message", [
    ("missing", "not regular file"),
    ("truncated", "runs past the end of"),
])
def test_broken_external_data_is_one_line_error(pair, capsys, damage, message):
    data = pair / "external" / "m.onnx.data"
    if damage == "missing":
        data.unlink()
    else:
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    code = main(["convert", str(pair / "external" / "m.onnx"), "-o", str(pair / "o.onnx"), "--calib",
                 str(pair / "ids.npy"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert not list(pair.glob("o.onnx*"))


OVER_2GIB = (2**31 + 2**27) // (4096 * 4)  # rows of a 4096-wide float32 table: 2.125 GiB


def test_model_over_2_gib_converts_without_loading_its_data(tmp_path):
    """A 2.1 GiB embedding table made cheaply: a sparse file with only the rows the inputs use written."""
    rng = np.random.default_rng(0)
    k = 4096
    table = TensorProto(name="table", data_type=TensorProto.FLOAT, dims=[OVER_2GIB, k])
    table.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "big.onnx.data"), ("offset", "0"), ("length", str(OVER_2GIB * k * 4))):
        table.external_data.add(key=key, value=value)
    rows = np.concatenate([rng.choice(OVER_2GIB, 40, replace=False), [OVER_2GIB - 1]])  # also past 2 GiB
    with open(tmp_path / "big.onnx.data", "wb") as f:
        f.truncate(OVER_2GIB * k * 4)
        for row in rows:
            f.seek(int(row) * k * 4)
            f.write(rng.standard_normal(k).astype(np.float32).tobytes())
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="/embed/Gather"),
        helper.make_node("MatMul", ["e", "fc1.w"], ["h0"], name="/fc1/MatMul"),
        helper.make_node("Add", ["h0", "fc1.b"], ["h1"], name="/fc1/Add"),
        helper.make_node("Relu", ["h1"], ["h2"], name="/act/Relu"),
        helper.make_node("MatMul", ["h2", "fc2.w"], ["y"], name="/fc2/MatMul"),
    ]
    inits = [table, init("fc1.w", rng.standard_normal((k, 64)) / np.sqrt(k)), init("fc1.b", rng.standard_normal(64)),
             init("fc2.w", rng.standard_normal((64, 16)) / 8)]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 6])],
                              [tensor("y", ["batch", 6, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (tmp_path / "big.onnx").write_bytes(model.SerializeToString())
    ids = rng.choice(rows, (32, 6)).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    try:
        _convert_and_check(tmp_path, ids)
    finally:  # 4 GiB of files: do not leave them to pytest's kept temporary folders
        for path in tmp_path.glob("*.data"):
            path.unlink()


def _convert_and_check(tmp_path: Path, ids: np.ndarray) -> None:
    script = (
        "import sys; from nq_onnx.cli import main; code = main(sys.argv[1:]);"
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]); sys.exit(code)"
    )
    run = subprocess.run([sys.executable, "-c", script, "convert", str(tmp_path / "big.onnx"), "-o",
                          str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "ids.npy"), "-q"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    peak_gib = int(run.stdout.strip().splitlines()[-1]) / 2**20
    assert peak_gib < 1.0, f"peak RSS {peak_gib:.2f} GiB: the 2.1 GiB table was loaded"
    (data,) = tmp_path.glob("q.onnx.*.data")
    assert data.stat().st_size > 2**31 and (tmp_path / "q.onnx").stat().st_size < 2**16
    feeds = {"ids": ids[:8]}
    reference = outputs(tmp_path / "big.onnx", feeds)
    quantized = outputs(tmp_path / "q.onnx", feeds)
    sqnr = 10 * np.log10(np.sum(reference**2) / np.sum((reference - quantized) ** 2))
    assert sqnr > 25, sqnr
    one_file = subprocess.run([sys.executable, "-m", "nq_onnx.cli", "convert", str(tmp_path / "big.onnx"), "-o",
                               str(tmp_path / "one.onnx"), "--calib", str(tmp_path / "ids.npy"), "-q", "--no-eval",
                               "--external-data", "no"], capture_output=True, text=True, timeout=900)
    assert one_file.returncode == 2 and "over protobuf's 2 GiB limit" in one_file.stderr, one_file.stderr
    assert len(one_file.stderr.strip().splitlines()) == 1 and not list(tmp_path.glob("one.onnx*"))


def test_exported_vit_with_external_data_converts_like_the_one_file_export(tmp_path, photo_folder):
    from nq_onnx.export import export_timm
    from nq_onnx.inspect import inspect_file

    kwargs = dict(model_kwargs=dict(img_size=64, depth=2), num_classes=10)
    one = export_timm("vit_small_patch16_224", tmp_path / "one.onnx", **kwargs)
    ext = export_timm("vit_small_patch16_224", tmp_path / "ext.onnx", external_data=True, **kwargs)
    assert ext.max_abs_diff == one.max_abs_diff < 1e-4
    export_timm("vit_small_patch16_224", tmp_path / "again.onnx", **kwargs)  # random weights come from the seed
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "one.onnx").read_bytes()
    assert len(list(tmp_path.glob("ext.onnx.*.data"))) == 1 and not list(tmp_path.glob("one.onnx.*"))
    config = QuantConfig(calib_size=12)
    a = nq_onnx.convert(tmp_path / "one.onnx", tmp_path / "one.nq.onnx", photo_folder, config)
    b = nq_onnx.convert(tmp_path / "ext.onnx", tmp_path / "ext.nq.onnx", photo_folder, config)
    assert b.summary.metrics == a.summary.metrics  # the same plan, the same output error
    assert len(list(tmp_path.glob("ext.nq.onnx.*.data"))) == 1
    assert a.summary.metrics["noisyquant"]["sqnr_db"] > 25
    inspection = inspect_file(tmp_path / "ext.nq.onnx")
    assert all(k.integer for k in inspection.layers)
