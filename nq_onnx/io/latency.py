"""Inference latency of several models, measured interleaved round-robin in one process.

Each model gets its own onnxruntime CPU session (``ORT_ENABLE_ALL``, 2 intra-op threads by default, thread spinning
off so one session's idle threads do not steal the cores from the next). After a warm-up, every round runs each
model once in turn, so drifts of the machine hit all models alike; the report gives the median and the
10th/90th percentiles per model.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def session(path: Path, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency_round_robin(models: dict[str, Path], batch: np.ndarray | dict[str, np.ndarray], rounds: int,
                        warmup: int = 3, threads: int = 2) -> dict:
    """``batch``: the first input's array, or an array per input name."""
    sessions = {name: session(path, threads) for name, path in models.items()}
    feeds = {name: batch if isinstance(batch, dict) else {s.get_inputs()[0].name: batch}
             for name, s in sessions.items()}
    size = len(next(iter(batch.values()))) if isinstance(batch, dict) else len(batch)
    for _ in range(warmup):
        for name, s in sessions.items():
            s.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[name])
            times[name].append((time.perf_counter() - start) * 1000)
    out = {}
    for name, values in times.items():
        v = np.array(values)
        out[name] = {
            "median_ms": float(np.median(v)),
            "p10_ms": float(np.percentile(v, 10)),
            "p90_ms": float(np.percentile(v, 90)),
            "runs": len(v),
            "batch": int(size),
            "images_per_s": float(size * 1000 / np.median(v)),
        }
    return out
