"""Where a conversion's seconds go: :func:`timed` adds each block's wall time to a dict and logs its start and end."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from typing import Iterator

_DEPTH = contextvars.ContextVar("nq_onnx_timed_depth", default=0)  # timed blocks open around the current one
log = logging.getLogger("nq_onnx.stages")


@contextlib.contextmanager
def timed(seconds: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall seconds of the ``with`` body to ``seconds[key]`` (a conversion's timings: each stage, each part
    of the search and each phase of a group's search accumulates here), and log its start and end: at INFO for a
    stage (a block inside no other), at DEBUG for the parts and phases within one."""
    depth = _DEPTH.get()
    token = _DEPTH.set(depth + 1)
    level = logging.INFO if depth == 0 else logging.DEBUG
    name = (key[:-2] if key.endswith("_s") else key).replace("_", " ")
    log.log(level, "%s ...", name)
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        seconds[key] = seconds.get(key, 0.0) + elapsed
        _DEPTH.reset(token)
        log.log(level, "%s: %.1f s", name, elapsed)
