"""Reading ONNX models with clear errors, and writing every output atomically.

The input model is only ever read. Outputs go to a temporary file in the destination folder, are
flushed to disk, and replace the final name in one ``os.replace``: an interrupted or failed write leaves
the previous file (or none) under the final name, never a partial one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from nq_onnx.core import external_data
from nq_onnx.core.atomic import remove_quietly, umask, write_bytes_atomic  # noqa: F401 (re-exported)
from nq_onnx.core.errors import ModelError, OutputError

MIN_OPSET = 13
MAX_OPSET = 21


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ModelError("model imports no default-domain opset")


def model_digest(path: str | Path, model: onnx.ModelProto) -> str:
    """SHA-256 of the model file, or for a model with external data, of the model file and its data files."""
    files = external_data.data_files(model)
    if not files:
        return file_digest(path)
    h = hashlib.sha256(file_digest(path).encode())
    for data in files:
        h.update(f"{data.name}:{file_digest(data)}".encode())
    return h.hexdigest()


def load_model(path: str | Path) -> tuple[onnx.ModelProto, str]:
    """Read, check and (if below opset 13) upgrade a model; returns it with its digest (:func:`model_digest`).

    Tensors in external data files stay there until needed (see :mod:`nq_onnx.core.external_data`)."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelError(f"{path} is a directory, not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else "parse failed"
        raise ModelError(f"{path} is not an ONNX model ({type(exc).__name__}: {detail})") from None
    if model.ir_version <= 0 or not model.HasField("graph") or len(model.graph.node) == 0:
        raise ModelError(f"{path} is not an ONNX model (no graph or no nodes)")
    external = external_data.has_external(model)
    try:  # by path when the checker must find data files beside the model
        onnx.checker.check_model(str(path) if external else model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "validation failed"
        raise ModelError(f"{path} fails the ONNX checker: {first}") from None
    if external:
        external_data.prepare(model, path.parent)
    opset = default_opset(model)
    if opset > MAX_OPSET:
        raise ModelError(f"{path} uses opset {opset}; nq-onnx supports opsets {MIN_OPSET} to {MAX_OPSET}")
    if opset < MIN_OPSET:
        model = convert_opset(model, MIN_OPSET, f"{path} uses opset {opset} (< {MIN_OPSET}, needed for per-channel "
                              "Q/DQ) and could not be upgraded")
    _name_nodes(model)
    return model, model_digest(path, model)


def convert_opset(model: onnx.ModelProto, opset: int, failure: str) -> onnx.ModelProto:
    """``model`` converted to ``opset`` with onnx's version converter and checked, metadata kept; a model the
    converter cannot take is a :class:`ModelError` that starts with ``failure``."""
    from onnx import version_converter

    try:
        upgraded = version_converter.convert_version(model, opset)
        onnx.checker.check_model(upgraded)
    except Exception as exc:  # the converter raises bare RuntimeErrors and worse
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{failure}: {detail}") from None
    del upgraded.metadata_props[:]
    upgraded.metadata_props.extend(model.metadata_props)  # including where external tensors are
    return upgraded


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes stable names so layers and plans can refer to them."""
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def check_output_path(path: str | Path, *, force: bool, inputs: tuple[str | Path, ...] = ()) -> Path:
    """Refuse an output that exists (without ``force``), is one of the inputs, or cannot be written."""
    path = Path(path)
    for source in inputs:
        if Path(source).exists() and path.exists() and os.path.samefile(source, path):
            raise OutputError(f"refusing to overwrite the input {source} with an output")
    if path.exists() and not force:
        raise OutputError(f"output {path} exists; pass --force to replace it")
    if path.is_dir():
        raise OutputError(f"output {path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder {parent} is not writable")
    try:  # os.access says yes to root even on a read-only folder; find out before any work is done
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"output folder {parent} is not writable ({exc.strerror or exc})") from None
    return path


def model_bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def save_model_atomic(model: onnx.ModelProto, path: str | Path, external: bool | None = None) -> Path | None:
    """Write ``model`` atomically; with ``external`` (by default: when it refers to external data or is too big
    for one protobuf) its large tensors go to a data file beside it, whose path is returned."""
    path = Path(path)
    if external is None:
        external = external_data.needs_external(model)
    if external:
        return external_data.save(model, path)
    size = external_data.total_size(model)
    if size >= external_data.PROTOBUF_LIMIT:  # found before anything is read in
        raise OutputError(f"{path}: the model is {size / 2**30:.1f} GiB, over protobuf's 2 GiB limit for one file; "
                          "it needs external data")
    if external_data.source_dir(model) is not None:  # read external tensors in; drop a folder only meaningful here
        model = external_data.inlined(model)
    write_bytes_atomic(path, model_bytes(model))
    return None

