"""Atomic file writes: a file appears under its name complete, or not at all (a leaf module: imports nothing of
nq-onnx but the errors)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar

from nq_onnx.core.errors import OutputError


def write_bytes_atomic(path: str | Path, data: bytes, before_replace: Callable[[str], None] | None = None) -> None:
    """Write ``data`` to ``path`` through a temporary file; ``before_replace`` may check (or refuse, by raising)
    the complete temporary file before it takes the final name."""
    write_file_atomic(path, lambda f: f.write(data), before_replace)


T = TypeVar("T")


def write_file_atomic(path: str | Path, write: Callable[[BinaryIO], T],
                      before_replace: Callable[[str], None] | None = None, name: Callable[[T], Path] | None = None,
                      suffix: str = ".tmp") -> tuple[Path, T]:
    """``write(f)`` into a temporary file beside ``path``, synced, then renamed to ``path`` (or to ``name(value)``,
    a name that depends on what was written); returns the final path and ``write``'s value. On any failure the
    temporary file is removed and nothing else exists."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            value = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; give the file the permissions open() would
        if before_replace is not None:
            before_replace(tmp)
        final = name(value) if name is not None else path
        os.replace(tmp, final)
        return final, value
    except OSError as exc:
        remove_quietly(tmp)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        remove_quietly(tmp)
        raise


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
