"""Atomic file writes: a file appears under its name complete, or not at all (a leaf module: imports nothing of
nq-onnx but the errors)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from nq_onnx.errors import OutputError


def write_bytes_atomic(path: str | Path, data: bytes, before_replace: Callable[[str], None] | None = None) -> None:
    """Write ``data`` to ``path`` through a temporary file; ``before_replace`` may check (or refuse, by raising)
    the complete temporary file before it takes the final name."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; give the file the permissions open() would
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
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
