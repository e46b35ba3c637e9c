"""What a sweep's workers run: one conversion, or one model on one shard of an evaluation set.

Both are plain functions of picklable values, run as they are by the serial executor and as Ray tasks by the Ray
one. A conversion is exactly ``nq_onnx.convert`` (no evaluation pass of its own), so a trial's model bytes are those
of the same conversion run by hand.
"""

from __future__ import annotations

import os
import platform
import socket
import time
from pathlib import Path

import numpy as np
import onnx

from nq_onnx.core.version import __version__
from nq_onnx.calibration.data import Preprocess
from nq_onnx.calibration.runtime import session
from nq_onnx.core.config import QuantConfig
from nq_onnx.io.cpu import blas_record, cpu_features
from nq_onnx.io.model_io import file_digest
from nq_onnx.sweep.evalset import EvalSet, load_shard


def convert_trial(model: str, calib: str, config: dict, output: str) -> dict:
    """Convert ``model`` with ``config`` (a :meth:`QuantConfig.to_dict`) into ``output``; what the record needs."""
    from nq_onnx.pipeline import convert

    reset_peak_rss()  # the record's peak is this trial's, not the worker's earlier tasks'
    start = time.perf_counter()
    result = convert(model, output, calib, QuantConfig.from_dict(config), force=True, evaluate=False)
    seconds = time.perf_counter() - start
    summary = result.summary
    return {"sha256": file_digest(output), "size_mb": Path(output).stat().st_size / 1e6, "convert_s": seconds,
            "noisy_groups": summary.noisy_groups, "reparam_groups": summary.reparam_groups,
            "average_bits": summary.average_bits, "worker": worker_record()}


def evaluate_shard(model: str, data: EvalSet, pre: Preprocess | None, start: int, stop: int, batch: int
                   ) -> np.ndarray:
    """The first output of ``model`` on inputs ``start .. stop - 1`` of ``data``: one onnxruntime session (one
    thread: the sweep's parallelism is across tasks), batches of ``batch`` from the shard's start."""
    proto = onnx.load(model)
    inputs = load_shard(data, pre, proto, start, stop)
    sess = session(proto, deploy=True, threads=1)
    if isinstance(inputs, np.ndarray):
        inputs = {sess.get_inputs()[0].name: inputs}
    name = sess.get_outputs()[0].name
    count = len(next(iter(inputs.values())))
    outputs = [sess.run([name], {k: v[i:i + batch] for k, v in inputs.items()})[0] for i in range(0, count, batch)]
    return np.concatenate(outputs).astype(np.float32)


def worker_record() -> dict:
    """Where a task ran (host, CPU, numpy's BLAS kernels, versions) and the high-water mark of its worker process's
    resident memory since :func:`reset_peak_rss` (the start of the trial), or over the process's life where the
    kernel cannot reset it (Linux; ``None`` elsewhere)."""
    node, node_id = _ray_node()
    return {"host": socket.gethostname(), "node": node, "node_id": node_id, "pid": os.getpid(),
            "peak_rss_mb": peak_rss_mb(),
            "platform": platform.platform(), "cpu": cpu_features().to_dict(), "blas": blas_record(),
            "versions": versions()}


def versions() -> dict:
    import onnxruntime

    record = {"nq_onnx": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
              "numpy": np.__version__, "python": platform.python_version()}
    try:
        import ray

        record["ray"] = ray.__version__
    except ImportError:
        pass
    return record


def _ray_node() -> tuple[str | None, str | None]:
    """The Ray node this task runs on: its address and its id (nodes on one machine share the address), or
    ``(None, None)`` outside Ray."""
    try:
        import ray
    except ImportError:
        return None, None
    if not ray.is_initialized():
        return None, None
    return ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()


def reset_peak_rss() -> None:
    """Start the process's resident-memory high-water mark again from its current size (Linux 4.0 and later:
    ``5`` written to ``/proc/self/clear_refs``); elsewhere nothing."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
