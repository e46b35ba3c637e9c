"""Models whose tensors live in ONNX external data files (any model over 2 GiB, and many exporters' output).

Such a model is held in memory *light*: its graph, and every tensor under :data:`INLINE_LIMIT` bytes, are
in the ``ModelProto``; larger tensors stay references into the data files beside the input, and the folder
they are resolved against travels with the model in the metadata entry :data:`DIR_KEY` (never written to an
output). Nothing reads those bytes until a pass needs a tensor's values: :func:`array` maps them from disk
(copy-on-write ``np.memmap``), onnxruntime sessions are told the folder, and a written model streams them
from the input's data file into its own. So a model is never loaded twice, and a float tensor no pass
touches (an embedding table, say) is never loaded at all.

Writing is atomic for the pair of files: the data file is named after the SHA-256 of its bytes
(``<model>.<digest>.data``), is complete on disk before the model file that names it replaces the previous
one in one ``os.replace``, and the previous output's data file is removed only afterwards. An interrupted
write leaves the previous model and its data, or nothing, under the final names.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto

from nq_onnx.core.atomic import remove_quietly, write_bytes_atomic, write_file_atomic
from nq_onnx.core.errors import ModelError

DIR_KEY = "nq_onnx.external_data_dir"
INLINE_LIMIT = 1 << 16  # external tensors below this many bytes are read into the model at load
THRESHOLD = 1024  # tensors of at least this many bytes go to the data file of a written model (onnx's default)
ALIGN = 4096  # data offsets are page aligned, so onnxruntime can map tensors instead of copying them
_CHUNK = 1 << 24
PROTOBUF_LIMIT = 2**31 - 1  # bytes one serialized ModelProto can hold


def is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def _info(tensor: TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def nbytes(tensor: TensorProto) -> int:
    """Bytes of the tensor's values, from its shape and type (strings have none that can be external)."""
    if tensor.data_type == TensorProto.STRING:
        return 0
    count = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    bits = {TensorProto.INT4: 4, TensorProto.UINT4: 4}.get(tensor.data_type)
    if bits is not None:
        return (count * bits + 7) // 8
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every tensor of the main graph that can hold external data: initializers and Constant node values."""
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def source_dir(model: onnx.ModelProto) -> Path | None:
    """The folder the model's external tensors are resolved against, or ``None`` if it has none."""
    for prop in model.metadata_props:
        if prop.key == DIR_KEY:
            return Path(prop.value)
    return None


def set_source_dir(model: onnx.ModelProto, folder: Path | None) -> None:
    """Record (or with ``None`` drop) the folder of ``model``'s external tensors."""
    kept = [p for p in model.metadata_props if p.key != DIR_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if folder is not None:
        model.metadata_props.add(key=DIR_KEY, value=str(folder))


def carry_source_dir(source: onnx.ModelProto, target: onnx.ModelProto) -> onnx.ModelProto:
    """``target`` built from ``source`` (by graphsurgeon, or by hand) resolves external tensors the same way."""
    set_source_dir(target, source_dir(source))
    return target


def has_external(model: onnx.ModelProto) -> bool:
    return any(is_external(t) for t in tensors(model))


def total_size(model: onnx.ModelProto) -> int:
    """Bytes of ``model`` as one file: the protobuf as held, plus the external tensors it would read in."""
    return model.ByteSize() + sum(nbytes(t) for t in tensors(model) if is_external(t))


def configure_session(options, model: onnx.ModelProto) -> bool:
    """Point onnxruntime ``SessionOptions`` at the folder of a light model's external tensors; ``True`` if it has
    one (the model is then passed as bytes, so onnxruntime could not find them otherwise)."""
    folder = source_dir(model)
    if folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    return folder is not None


def _location(folder: Path, tensor: TensorProto) -> tuple[Path, int, int]:
    """File, offset and length of an external tensor, checked against the file on disk."""
    info = _info(tensor)
    relative = info.get("location", "")
    path = folder / relative
    if not relative or Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise ModelError(f"tensor {tensor.name!r} has an invalid external data location {relative!r}")
    if not path.is_file():
        raise ModelError(f"external data file {path} of tensor {tensor.name!r} is missing")
    offset = int(info.get("offset", 0) or 0)
    length = nbytes(tensor)
    if "length" in info and int(info["length"]) != length:
        raise ModelError(
            f"tensor {tensor.name!r} declares {info['length']} bytes of external data; its shape and type need {length}"
        )
    size = path.stat().st_size
    if offset + length > size:
        raise ModelError(
            f"external data of tensor {tensor.name!r} runs past the end of {path} "
            f"({length} bytes at offset {offset}; the file has {size})"
        )
    return path, offset, length


def prepare(model: onnx.ModelProto, folder: Path) -> None:
    """Check a just-read model's external tensors, read the small ones in, and record ``folder`` for the rest."""
    external = False
    for tensor in tensors(model):
        if not is_external(tensor):
            continue
        path, offset, length = _location(folder, tensor)
        if length < INLINE_LIMIT:
            with open(path, "rb") as f:
                f.seek(offset)
                tensor.raw_data = f.read(length)
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]
        else:
            external = True
    set_source_dir(model, folder.resolve() if external else None)


def data_files(model: onnx.ModelProto) -> list[Path]:
    """The distinct data files ``model``'s external tensors are in, sorted."""
    folder = source_dir(model)
    if folder is None:
        return []
    return sorted({folder / _info(t)["location"] for t in tensors(model) if is_external(t)})


def array(tensor: TensorProto, folder: Path) -> np.ndarray:
    """The values of an external tensor, mapped from its data file (copy-on-write: writes stay in memory)."""
    path, offset, _ = _location(folder, tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4, TensorProto.BFLOAT16) or dtype.kind not in "biuf":
        return onnx.numpy_helper.to_array(tensor, base_dir=str(folder))  # no plain memory layout to map
    shape = tuple(int(d) for d in tensor.dims)
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="c", offset=offset, shape=shape)


def inlined(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every external tensor read in (for writing one self-contained file)."""
    folder = source_dir(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in tensors(out):
        if is_external(tensor):
            tensor.raw_data = b"".join(_raw_chunks(tensor, folder))
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]
    set_source_dir(out, None)
    return out


def _raw_chunks(tensor: TensorProto, folder: Path | None) -> Iterator[bytes]:
    """The little-endian bytes of a tensor, in chunks, from memory or from its input data file."""
    if is_external(tensor):
        if folder is None:
            raise RuntimeError(f"tensor {tensor.name!r} is external but its model records no folder")
        path, offset, length = _location(folder, tensor)
        with open(path, "rb") as f:
            f.seek(offset)
            while length > 0:
                chunk = f.read(min(_CHUNK, length))
                if not chunk:
                    raise ModelError(f"{path} ended while reading tensor {tensor.name!r}")
                length -= len(chunk)
                yield chunk
    elif tensor.HasField("raw_data"):
        yield tensor.raw_data
    else:
        values = onnx.numpy_helper.to_array(tensor)
        yield np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes()


def _header(tensor: TensorProto, location: str, offset: int, length: int) -> TensorProto:
    out = TensorProto(name=tensor.name, data_type=tensor.data_type, doc_string=tensor.doc_string)
    out.dims.extend(tensor.dims)
    out.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        out.external_data.add(key=key, value=value)
    return out


def _copy_fields(source, target, skip: str) -> None:
    """Copy every set field of one protobuf message into another, except the field ``skip``."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        slot = getattr(target, field.name)
        if hasattr(slot, "extend"):
            slot.extend(value)
        elif hasattr(slot, "CopyFrom"):
            slot.CopyFrom(value)
        else:
            setattr(target, field.name, value)


def needs_external(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is written with external data: it was read with some (external data in, external data
    out), it refers to some, or it is too big for one protobuf."""
    return source_dir(model) is not None or has_external(model) or model.ByteSize() >= PROTOBUF_LIMIT - (1 << 20)


def save(model: onnx.ModelProto, path: Path, check: bool = True) -> Path:
    """Write ``model`` to ``path`` with its tensors of :data:`THRESHOLD` bytes or more in one data file beside it;
    returns the data file's path. See the module docstring for the order that makes it atomic."""
    parent = path.parent if str(path.parent) else Path(".")
    previous = _previous_data(path)
    data_path, (placed, digest) = write_file_atomic(
        path, lambda f: _write_data(model, f), name=lambda written: parent / _data_name(path, written[1]),
        suffix=".data.tmp")
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
    light.graph.initializer.extend(t if at < 0 else _header(t, data_path.name, at, size) for t, at, size in placed)
    set_source_dir(light, None)

    def validate(tmp_model: str) -> None:
        if check:  # by path: the checker resolves the data file beside the temporary model file
            try:
                onnx.checker.check_model(tmp_model, full_check=True)
            except onnx.checker.ValidationError as exc:  # a bug of ours, not the user's input
                raise RuntimeError(f"nq-onnx produced an invalid model: {exc}") from exc

    try:
        write_bytes_atomic(path, light.SerializeToString(deterministic=True), before_replace=validate)
    except BaseException:
        if data_path not in previous:
            remove_quietly(str(data_path))
        raise
    sources = set(data_files(model))
    for old in previous - {data_path} - sources:  # only our own naming: never a file some other model made
        if old.parent == data_path.parent and old.name.startswith(f"{path.name}.") and old.name.endswith(".data"):
            remove_quietly(str(old))
    return data_path


def _data_name(path: Path, digest: str) -> str:
    return f"{path.name}.{digest[:16]}.data"


def _write_data(model: onnx.ModelProto, f) -> tuple[list[tuple[TensorProto, int, int]], str]:
    """The large tensors' raw bytes, each at an :data:`ALIGN`-aligned offset; ``(placement, sha256 of the file)``
    where a placement is ``(tensor, offset or -1 if it stays inline, bytes)``."""
    folder_in = source_dir(model)
    placed: list[tuple[TensorProto, int, int]] = []
    digest = hashlib.sha256()
    offset = 0
    for tensor in model.graph.initializer:
        size = nbytes(tensor)
        if size < THRESHOLD or tensor.data_type == TensorProto.STRING:
            placed.append((tensor, -1, 0))
            continue
        pad = -offset % ALIGN
        f.write(b"\0" * pad)
        digest.update(b"\0" * pad)
        offset += pad
        written = 0
        for chunk in _raw_chunks(tensor, folder_in):
            f.write(chunk)
            digest.update(chunk)
            written += len(chunk)
        if written != size:
            raise RuntimeError(f"tensor {tensor.name!r} has {written} bytes of data, expected {size}")
        placed.append((tensor, offset, size))
        offset += size
    return placed, digest.hexdigest()


def _previous_data(path: Path) -> set[Path]:
    """Data files the model now at ``path`` refers to (so that replacing it can remove them afterwards)."""
    if not path.is_file():
        return set()
    try:
        old = onnx.load(str(path), load_external_data=False)
    except Exception:  # not a model we can read: leave whatever is beside it alone
        return set()
    parent = path.parent if str(path.parent) else Path(".")
    return {parent / _info(t).get("location", "") for t in tensors(old) if is_external(t)}
