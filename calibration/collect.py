"""One streamed float pass over the calibration set: per-channel running min and max of every group input.

Memory stays bounded by one batch of activations: for each tensor only ``min_c`` and ``max_c`` (over every
axis but the last, so per input channel of the layers that read it) are kept, and the batch is small enough that
its exposed activations stay within :data:`OUTPUT_BUDGET` (the first input runs alone to measure them). Minimum
and maximum do not depend on how the inputs are batched, so neither do the statistics.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import onnx

from nq_onnx.calibration.data import Dataset
from nq_onnx.calibration.runtime import session, with_outputs
from nq_onnx.core.errors import DataError

OUTPUT_BUDGET = 128 << 20  # bytes of exposed activations per calibration batch (ViT-S/14 at 224: 2 images)
REDUCE_WIDTH = 4096  # values per row of the folded view the ranges are reduced over (column_range)


@dataclasses.dataclass
class TensorStats:
    channel_min: np.ndarray
    channel_max: np.ndarray
    count: int = 0

    @property
    def absmax(self) -> float:
        return float(max(np.abs(self.channel_min).max(), np.abs(self.channel_max).max()))

    def update(self, x: np.ndarray) -> None:
        rows = x.reshape(-1, x.shape[-1])
        low, high = column_range(rows)
        self.channel_min = np.minimum(self.channel_min, low)
        self.channel_max = np.maximum(self.channel_max, high)
        self.count += rows.shape[0]


def column_range(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column minimum and maximum of ``rows`` (``[R, C]``).

    numpy reduces over axis 0 one row at a time, and for rows of a few hundred values its per-row loop, not memory,
    sets the pace. So ``k = REDUCE_WIDTH // C`` rows are first viewed as one row of ``k C`` values, reduced, and
    the ``k`` pieces of the result reduced again (``min_r x_rc = min_j min_i x_(ik+j)c``: exact), the ``R mod k``
    rows left over folded in at the end. Half the time of ``rows.min(0), rows.max(0)`` on a ViT's group inputs."""
    count, width = rows.shape
    k = min(count, REDUCE_WIDTH // max(width, 1))
    if k < 2:
        return rows.min(axis=0), rows.max(axis=0)
    whole = count - count % k
    wide = rows[:whole].reshape(whole // k, k * width)
    low, high = wide.min(axis=0).reshape(k, width).min(axis=0), wide.max(axis=0).reshape(k, width).max(axis=0)
    if whole < count:
        np.minimum(low, rows[whole:].min(axis=0), out=low)
        np.maximum(high, rows[whole:].max(axis=0), out=high)
    return low, high


def collect_stats(
    model: onnx.ModelProto, tensors: list[str], dataset: Dataset, batch_size: int, progress: Callable | None = None
) -> dict[str, TensorStats]:
    """Run the float model over ``dataset`` and keep per-channel ranges of ``tensors``, in batches of at most
    ``batch_size`` inputs (fewer where a batch's exposed activations would pass :data:`OUTPUT_BUDGET`)."""
    sess = session(with_outputs(model, tensors))
    stats: dict[str, TensorStats] = {}
    first = next(dataset.batches(1), None)
    if first is None:
        return stats
    per_input = _update(stats, tensors, sess.run(tensors, first))
    batch = max(1, min(batch_size, OUTPUT_BUDGET // max(per_input, 1)))
    batches = dataset.batches(batch, first=1)
    if progress is not None:
        batches = progress(batches, total=-(-(len(dataset) - 1) // batch), desc="calibrate")
    for feeds in batches:
        _update(stats, tensors, sess.run(tensors, feeds))
    return stats


def _update(stats: dict[str, TensorStats], tensors: list[str], outputs: list[np.ndarray]) -> int:
    """Fold one batch's outputs into ``stats``; returns their size in bytes."""
    size = 0
    for name, value in zip(tensors, outputs):
        size += value.nbytes
        value = value.astype(np.float32, copy=False)
        if name not in stats:
            width = value.shape[-1] if value.ndim else 1
            stats[name] = TensorStats(np.full(width, np.inf, np.float32), np.full(width, -np.inf, np.float32))
        stats[name].update(value if value.ndim else value.reshape(1, 1))
        # min and max propagate NaN and reach +-Inf: checking them checks every value, without another pass
        if not (np.all(np.isfinite(stats[name].channel_min)) and np.all(np.isfinite(stats[name].channel_max))):
            raise DataError(f"the float model produces NaN or Inf in {name!r} on the calibration data")
    return size


def sample_rows(
    model: onnx.ModelProto, tensors: list[str], dataset: Dataset, batch_size: int, rows: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """At most ``rows`` rows (``[-1, channels]``) of each float tensor, drawn uniformly per batch (bounded memory)."""
    sess = session(with_outputs(model, tensors))
    rng = np.random.default_rng(seed)
    batches = -(-len(dataset) // batch_size)
    per_batch = max(1, rows // max(batches, 1))
    kept: dict[str, list[np.ndarray]] = {name: [] for name in tensors}
    for feeds in dataset.batches(batch_size):
        for name, value in zip(tensors, sess.run(tensors, feeds)):
            flat = value.reshape(-1, value.shape[-1]).astype(np.float32)
            pick = rng.choice(len(flat), min(per_batch, len(flat)), replace=False)
            kept[name].append(flat[np.sort(pick)])
    return {name: np.concatenate(parts)[:rows] for name, parts in kept.items()}


def float_values(model: onnx.ModelProto, tensors: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float values of ``tensors`` on ``feeds`` (a few images: every value is kept whole)."""
    sess = session(with_outputs(model, tensors))
    return dict(zip(tensors, (v.astype(np.float32, copy=False) for v in sess.run(tensors, feeds))))
