"""A sweep's results file: JSON lines, appended one at a time, read back to resume.

The first line (``"kind": "sweep"``) names what the sweep converts and evaluates (the model's digest, the data)
and FP32's figures; then one ``"kind": "trial"`` line per finished trial (succeeded or failed), one ``"kind":
"latency"`` line per timed model, and one ``"kind": "run"`` line per invocation (executor, workers, wall times).
Each line is written with one ``write`` at the end of the file and synced before the next is recorded, so an
interruption loses at most the line being written: a torn last line is cut off before the next append.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from nq_onnx.core.errors import ConfigError, OutputError
from nq_onnx.io.model_io import file_digest


def data_digest(path: Path) -> str:
    """A file's SHA-256, or for a folder the digest of its files' relative names and sizes."""
    if path.is_file():
        return file_digest(path)
    h = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{item.relative_to(path)}\0{item.stat().st_size}\n".encode())
    return h.hexdigest()


class ResultsFile:
    """The lines of ``path``, by kind; :meth:`append` adds one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header: dict | None = None
        self.trials: dict[str, dict] = {}
        self.latency: dict[str, dict] = {}
        self.runs: list[dict] = []  # one line per invocation: executor, workers, wall times
        self._valid_bytes = 0
        if path.exists():
            self._read()

    def _read(self) -> None:
        data = self.path.read_bytes()
        self._valid_bytes = data.rfind(b"\n") + 1  # a torn last line is not a line
        for number, line in enumerate(data[:self._valid_bytes].splitlines(), 1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"{self.path}: line {number} is not JSON; is this a sweep results file?") from None
            kind = entry.get("kind")
            if kind == "sweep":
                self.header = entry
            elif kind == "trial":
                self.trials[entry["trial"]] = entry
            elif kind == "latency":
                self.latency[entry["trial"]] = entry
            elif kind == "run":
                self.runs.append(entry)

    def check(self, identity: dict) -> None:
        """Refuse to resume a results file of another sweep (another model or data)."""
        if self.header is None:
            if self.trials or self.latency:
                raise ConfigError(f"{self.path}: has trials but no sweep line; not a results file to resume")
            return
        theirs = self.header["identity"]
        for key in sorted(set(identity) | set(theirs)):
            if theirs.get(key) != identity.get(key):
                raise ConfigError(f"{self.path} belongs to another sweep ({key} differs: {theirs.get(key)!r} there, "
                                  f"{identity.get(key)!r} now); give another out folder")

    def append(self, entry: dict) -> None:
        line = (json.dumps(entry, sort_keys=True, allow_nan=True) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o666)
            try:
                if os.fstat(fd).st_size != self._valid_bytes:
                    os.ftruncate(fd, self._valid_bytes)
                os.lseek(fd, self._valid_bytes, os.SEEK_SET)
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self._valid_bytes += len(line)
        kind = entry["kind"]
        if kind == "sweep":
            self.header = entry
        elif kind in ("trial", "latency"):
            getattr(self, "trials" if kind == "trial" else "latency")[entry["trial"]] = entry
        elif kind == "run":
            self.runs.append(entry)
