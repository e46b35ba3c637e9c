"""Choose and apply LayerNorm reparameterization factors (the maths is in :mod:`nq_onnx.passes.reparam_layernorm`).

For a group whose calibrated per-channel range is ``[m_k, M_k]``, with centre ``c_k = (m_k + M_k) / 2`` and
half-width ``h_k = (M_k - m_k) / 2``, the factors are ::

    r_k = h_k / mean(h)        (r_k = 1 where h_k = 0: a constant channel, which the shift sends to 0)

so that ``X' = (X - c) / r`` has every channel in ``[-mean(h), mean(h)]``: one symmetric per-tensor step fits all
of them, as RepQ-ViT's per-channel-to-per-tensor reparameterization does for its asymmetric quantizer (its target
is the mean of the channels' steps). The calibrated ranges of ``X'`` follow exactly, ``[(m - c) / r, (M - c) / r]``,
so no second calibration pass is needed.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from nq_onnx.calibration.collect import TensorStats
from nq_onnx.passes.base import PassResult, Skip, SkipKind, import_graph
from nq_onnx.passes.find_layers import Layers
from nq_onnx.passes.reparam_layernorm import ReparamLayerNorm
from nq_onnx.plan import Reparam


def choose(stats: TensorStats) -> Reparam:
    """Factors that give every channel the mean half-width, centred on zero (module docstring)."""
    low, high = stats.channel_min.astype(np.float64), stats.channel_max.astype(np.float64)
    centre, half = (low + high) / 2.0, (high - low) / 2.0
    target = float(half.mean())
    scale = np.where(half > 0, half / target, 1.0) if target > 0 else np.ones_like(half)
    return Reparam(scale.astype(np.float32), centre.astype(np.float32))


def reparameterized_stats(stats: TensorStats, reparam: Reparam) -> TensorStats:
    """The calibrated ranges of ``X' = (X - c) / r`` (``r > 0`` keeps min below max)."""
    r, c = reparam.scale, reparam.shift
    low, high = ((stats.channel_min - c) / r).astype(np.float32), ((stats.channel_max - c) / r).astype(np.float32)
    return TensorStats(low, high, stats.count)


def reparameterize(model: onnx.ModelProto, layers: Layers,
                   factors: dict[str, Reparam]) -> tuple[onnx.ModelProto, PassResult]:
    """The float model with ``factors`` folded in; the pass result says which groups were rewritten and why others
    were not. Find the layers again on the returned model: their weights and biases are new constants."""
    graph = import_graph(model)
    result = ReparamLayerNorm(layers, factors)(graph)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out, result


def candidates(layers: Layers, stats: dict[str, TensorStats],
               min_rows: int = 0) -> tuple[dict[str, Reparam], list[Skip]]:
    """Factors for every group read only by linear layers whose ranges were calibrated on at least ``min_rows``
    rows (the pass refuses those not fed by a LayerNorm), and the groups left out for too few rows. A range from
    few rows (a pooled head sees one per image) is too loose to centre and scale on: held-out rows beyond it would
    be clipped, as for NoisyQuant's shift."""
    factors, skipped = {}, []
    for g in layers.groups:
        if not g.noisy or g.channels <= 1:
            continue
        count = stats[g.tensor].count
        if count >= min_rows:
            factors[g.name] = choose(stats[g.tensor])
        else:
            skipped.append(Skip(g.name, f"calibrated on fewer than {min_rows} rows ({count})",
                                SkipKind.NOT_REPARAMETERIZED))
    return factors, skipped
