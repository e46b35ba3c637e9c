"""Output error of quantized models against the float model, on the same inputs.

For reference outputs ``y`` and quantized outputs ``y'`` (the first model output, flattened per sample)::

    mse = mean((y - y')^2)     cosine = <y, y'> / (|y| |y'|)     sqnr_db = 10 log10(sum y^2 / sum (y - y')^2)

and, for 2-D outputs (logits), the share of samples whose arg-max agrees with the float model's and, when
labels are given, top-1 accuracy.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx

from nq_onnx.calibration.data import Dataset
from nq_onnx.calibration.runtime import session


def model_outputs(
    model: onnx.ModelProto, dataset: Dataset, batch_size: int, progress: Callable | None = None, desc: str = "evaluate"
) -> np.ndarray:
    sess = session(model, deploy=True)
    name = sess.get_outputs()[0].name
    batches = dataset.batches(batch_size)
    if progress is not None:
        batches = progress(batches, total=-(-len(dataset) // batch_size), desc=desc)
    return np.concatenate([sess.run([name], feeds)[0] for feeds in batches]).astype(np.float32)


def output_metrics(reference: np.ndarray, output: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    out = output.reshape(len(output), -1).astype(np.float64)
    err = float(np.sum((ref - out) ** 2))
    metrics = {
        "mse": float(np.mean((ref - out) ** 2)),
        "cosine": float(np.sum(ref * out) / max(np.linalg.norm(ref) * np.linalg.norm(out), 1e-300)),
        "sqnr_db": float("inf") if err == 0 else float(10 * np.log10(np.sum(ref**2) / err)),
    }
    if reference.ndim == 2 and reference.shape[1] > 1:
        metrics["top1_agreement"] = float(np.mean(ref.argmax(1) == out.argmax(1)))
        if labels is not None:
            metrics["top1"] = float(np.mean(out.argmax(1) == labels))
    return metrics
