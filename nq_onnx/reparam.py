"""Choose and apply LayerNorm and attention reparameterization factors (the maths is in
:mod:`nq_onnx.passes.reparam_layernorm` and :mod:`nq_onnx.passes.reparam_attention`).

For a group whose calibrated per-channel range is ``[m_k, M_k]``, with centre ``c_k = (m_k + M_k) / 2`` and
half-width ``h_k = (M_k - m_k) / 2``, the factors are ::

    r_k = h_k / mean(h)        (r_k = 1 where h_k = 0: a constant channel, which the shift sends to 0)

so that ``X' = (X - c) / r`` has every channel in ``[-mean(h), mean(h)]``: one symmetric per-tensor step fits all
of them, as RepQ-ViT's per-channel-to-per-tensor reparameterization does for its asymmetric quantizer (its target
is the mean of the channels' steps). The calibrated ranges of ``X'`` follow exactly, ``[(m - c) / r, (M - c) / r]``,
so no second calibration pass is needed. Attention factors come from the calibrated ranges of the columns of the
layers that produce ``Q`` and ``K`` (:func:`attention_factors`), which also give the rewritten operands' ranges.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from nq_onnx.calibration.collect import TensorStats
from nq_onnx.passes.base import PassResult, Skip, SkipKind, import_graph
from nq_onnx.passes.find_layers import Layers
from nq_onnx.passes.reparam_attention import AttentionSite, ReparamAttention
from nq_onnx.passes.reparam_layernorm import ReparamLayerNorm
from nq_onnx.plan import AttentionReparam, Reparam


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
    return _rewrite(model, ReparamLayerNorm(layers, factors))


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


def attention_factors(site: AttentionSite, stats: dict[str, TensorStats]) -> AttentionReparam:
    """K centred on its calibrated mid-range and each Q/K channel pair balanced
    (:mod:`nq_onnx.passes.reparam_attention`).

    With ``[m, M]`` the calibrated range of a K channel, ``c = (m + M) / 2`` and ``h = (M - m) / 2``, and ``a`` the
    absolute maximum of its Q partner, ``s = sqrt(h / a)`` gives both channels the range ``sqrt(a h)`` (times the
    scalars on their way to the scores): the smallest common bound of a pair whose product is fixed. ``s = 1`` where
    either channel is constant zero."""
    q, k = stats[site.q_tensor], stats[site.k_tensor]
    q_low, q_high = q.channel_min[site.q_columns].astype(np.float64), q.channel_max[site.q_columns].astype(np.float64)
    k_low, k_high = k.channel_min[site.k_columns].astype(np.float64), k.channel_max[site.k_columns].astype(np.float64)
    centre, half = (k_low + k_high) / 2.0, (k_high - k_low) / 2.0
    absmax = np.maximum(np.abs(q_low), np.abs(q_high))
    ok = (half > 0) & (absmax > 0)
    scale = np.sqrt(np.where(ok, half, 1.0) / np.where(ok, absmax, 1.0))
    return AttentionReparam(scale.astype(np.float32), centre.astype(np.float32))


def attention_operand_stats(site: AttentionSite, factor: AttentionReparam,
                            stats: dict[str, TensorStats]) -> tuple[TensorStats, TensorStats]:
    """The calibrated per-tensor ranges of the rewritten ``Q'`` and ``K'`` operands, from their columns' ranges (one
    value each: the activation-matmul quantizers are per tensor). ``Q' = f_q s x_q`` and
    ``K' = f_k (x_k - c) / s`` for each pair, with ``f`` the scalars on the way."""
    def tensor_range(low: np.ndarray, high: np.ndarray, count: int) -> TensorStats:
        ends = np.stack([low, high])
        return TensorStats(np.float32([ends.min()]), np.float32([ends.max()]), count)

    s, c = factor.scale.astype(np.float64), factor.shift.astype(np.float64)
    q, k = stats[site.q_tensor], stats[site.k_tensor]
    q_ends = site.q_factor * s * np.stack([q.channel_min[site.q_columns], q.channel_max[site.q_columns]])
    k_ends = site.k_factor / s * (np.stack([k.channel_min[site.k_columns], k.channel_max[site.k_columns]]) - c)
    return tensor_range(q_ends.min(0), q_ends.max(0), q.count), tensor_range(k_ends.min(0), k_ends.max(0), k.count)


def reparameterize_attention(model: onnx.ModelProto, layers: Layers,
                             factors: dict[str, AttentionReparam]) -> tuple[onnx.ModelProto, PassResult]:
    """The float model with the attention ``factors`` folded in (see :func:`reparameterize`)."""
    return _rewrite(model, ReparamAttention(layers, factors))


def _rewrite(model: onnx.ModelProto, rewrite) -> tuple[onnx.ModelProto, PassResult]:
    graph = import_graph(model)
    result = rewrite(graph)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out, result
