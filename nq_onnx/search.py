"""EasyQuant scale search and NoisyQuant noise search, on a sample of one group's input activations.

Both work on a token sample ``X`` (rows ``[T, K]``) of the group's input, taken after the already-planned
earlier layers were quantized, and on each consumer's float layer ``f_l(X) = X W_l + B_l``.

EasyQuant (Wu et al. 2020), alternating for ``rounds``: with the activation step fixed, each output
channel ``c`` of each layer picks ``s_c = a * s_c^minmax`` (``a`` on a grid) maximizing the cosine similarity
of that channel's quantized output with the float one; then the shared activation step ``s = a * s^minmax``
maximizes the mean cosine similarity of the layer outputs. With ``SearchConfig.objective`` Pearson (PTQ-ViT's
similarity-aware search) both maximize the Pearson correlation instead (:mod:`nq_onnx.objectives`).

NoisyQuant (Liu et al. 2023): a fixed vector ``N = -b * centre + k * s * u`` with ``u ~ U(-1/2, 1/2)^K``
drawn once per group (``centre`` is the per-channel mid-range, ``s`` the activation step). The paper's noisy
bias is the second term alone, its width ``k`` searched (``NoiseMode.PAPER``); the authors' code also searches a
mean shift ``b`` (``NoiseMode.SHIFT`` alone, ``NoiseMode.BOTH`` together; ``b > 0`` only where the per-channel
ranges were calibrated on at least ``shift_min_rows`` rows, as centring on a loose range clips held-out rows).
The grid over ``(b, k)`` includes ``(0, 0)``, the EasyQuant solution, and each candidate quantizes ``X + N``
with a step from the range of ``X + N``; the candidate minimizing the summed layer output MSE ::

    sum_l || dq(q(X + N)) dq(W_l) + (B_l - N dq(W_l)) - f_l(X) ||^2

wins, and the activation step is then refined for it on the same objective. On its own sample that cannot lose
to EasyQuant, so it proves nothing: where rows of images no search fitted on are given (``held_out``), the
noise is kept only if the same objective on them is lower than EasyQuant's, else the group takes no noise
(``noise_rejected`` in the layer's metrics; both held-out errors are recorded).

Cosine similarity ignores magnitude, so a scale that clips (shrinks) an output can score well and still have
a large output error; where the EasyQuant solution's summed output MSE on the sample exceeds MinMax's, the
MinMax scales are kept (``minmax_kept`` in the layer's search metrics).

A search takes one input value (:class:`GroupSearch`: the sample, the operands, the quantizers, the settings) and
returns one result value (:class:`GroupResult`, with every layer's weight steps); it mutates nothing. Every
quantization it scores is a :mod:`nq_onnx.quantizers` quantizer's, the same the simulation and the passes use.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Callable

import numpy as np

from nq_onnx.config import NoiseMode, Objective, SearchConfig
from nq_onnx.objectives import LayerError, colsum, cosine_of, dot, ranking_loss, ranking_pairs, similarity_of
from nq_onnx.quantizers import ActQuantizer, WeightQuantizer


@dataclasses.dataclass(frozen=True)
class LinearOperand:
    """A consumer of the group in ``X @ W + B`` layout: ``W`` is ``[K, N]`` (the canonical ``MatMul`` layout)."""

    name: str
    weight: np.ndarray
    bias: np.ndarray
    quantizer: WeightQuantizer

    def minmax_scales(self) -> np.ndarray:
        return self.quantizer.minmax_scales(self.weight)

    def quantized_weight(self, scales: np.ndarray) -> np.ndarray:
        return self.quantizer.fake_quant(self.weight, scales)


@dataclasses.dataclass(frozen=True)
class GroupSample:
    """What calibration knows of one group's input: token rows to fit on, rows of other images to check on
    (``held_out``), its range over all calibration rows, and how many rows that range came from."""

    x: np.ndarray
    absmax: float
    channel_min: np.ndarray
    channel_max: np.ndarray
    held_out: np.ndarray | None = None
    calib_rows: int | None = None  # None: enough to centre on


@dataclasses.dataclass(frozen=True)
class GroupSearch:
    """The input of one group's search. ``noise_mode = None``: EasyQuant only. ``noise_seed`` seeds the group's
    uniform noise draw (:func:`group_seed`)."""

    sample: GroupSample
    layers: tuple[LinearOperand, ...]
    act: ActQuantizer
    config: SearchConfig
    noise_mode: NoiseMode | None = None
    noise_seed: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if self.noise_mode is not None and not self.act.signed:
            raise ValueError("a noisy group is quantized signed: X + N can be negative")


@dataclasses.dataclass
class GroupResult:
    scale: float
    weight_scales: dict[str, np.ndarray]
    metrics: dict[str, dict[str, float]]
    noise: np.ndarray | None = None
    noise_shift: float = 0.0
    noise_amplitude: float = 0.0
    base_scale: float = 0.0  # the EasyQuant step, before any noise search


LOSS_PARTS = 4  # disjoint row sets a summed-MSE search scores one at a time (additive_argmin)


def grid(spec: tuple[float, float, int]) -> np.ndarray:
    low, high, count = spec
    return np.linspace(low, high, int(count), dtype=np.float64)


def grid_argmax(count: int, score: Callable[[int], float], stride: int, screen: Callable[[int], float] | None = None,
                keep: int = 1) -> tuple[int, float]:
    """The index of the highest ``score`` over grid points ``0..count-1`` (ties: the lowest index), scored coarse to
    fine: every ``stride``-th point and the last, then the points less than ``stride`` away from the best of
    those. ``stride = 1`` scores every point (the default: coarser strides cost held-out accuracy,
    ``benchmarks/compile_cost.py``).

    With ``screen`` (a cheaper estimate of ``score``: the same objective on a subset of the rows) the grid is
    searched as above on ``screen``, and only its ``keep`` best points are scored with ``score``: the result is the
    full search's wherever the full search's best point is among the screen's ``keep`` best."""
    def search(f: Callable[[int], float]) -> dict[int, float]:
        scores = {i: f(i) for i in sorted({*range(0, count, stride), count - 1})}
        best = min(scores, key=lambda i: (-scores[i], i))
        for i in range(max(best - stride + 1, 0), min(best + stride, count)):
            if i not in scores:
                scores[i] = f(i)
        return scores

    if screen is None:
        scores = search(score)
    else:
        screened = search(screen)
        scores = {i: score(i) for i in sorted(screened, key=lambda i: (-screened[i], i))[:keep]}
    best = min(scores, key=lambda i: (-scores[i], i))
    return best, scores[best]


def screen_rows(x: np.ndarray, tokens: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The rows of ``x`` candidates are screened on (:func:`grid_argmax`) and each one's weight, or ``None`` where
    ``tokens`` (0: no screening) is not below the row count. A stratified sample: the quarter of ``tokens`` rows
    with the largest magnitude, each counted once (the few outliers that decide how much a step clips), and evenly
    spaced rows of the rest, each counted for the rows it stands for."""
    rows = x.shape[0]
    if not 0 < tokens < rows:
        return None
    top = np.sort(np.argsort(-np.abs(x).max(axis=1), kind="stable")[: tokens // 4])
    rest = np.setdiff1d(np.arange(rows), top)
    spaced = rest[np.linspace(0, rest.size - 1, tokens - top.size).round().astype(np.int64)]
    index = np.concatenate([top, spaced])
    weight = np.concatenate([np.ones(top.size), np.full(spaced.size, rest.size / spaced.size)])
    order = np.argsort(index, kind="stable")
    return index[order], weight[order]


def additive_argmin(count: int, part: Callable[[int, int], float], parts: int) -> tuple[int, float]:
    """The index ``i`` of the lowest ``sum_j part(i, j)`` over ``j < parts`` (ties: the lowest index) and that sum,
    for non-negative parts (a loss summed over disjoint sets of rows).

    Candidates are taken in the order of their first part, and one stops being summed as soon as its partial sum
    exceeds the lowest complete sum found: a partial sum only grows, so the result is the full search's, for
    fewer parts scored."""
    first = [part(i, 0) for i in range(count)]
    best, best_sum = -1, np.inf
    for i in sorted(range(count), key=lambda i: (first[i], i)):
        if first[i] > best_sum:
            break
        total = first[i]
        for j in range(1, parts):
            if total > best_sum:
                break
            total += part(i, j)
        if total < best_sum or (total == best_sum and i < best):
            best, best_sum = i, total
    return best, float(best_sum)


def sample_rows(x: np.ndarray, channels: int, tokens: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``tokens`` rows of ``x`` viewed as ``[-1, channels]``.

    The eighth of rows with the largest magnitude is always kept: in a ViT the class token carries the
    largest values and is the only one the classifier reads, and a uniform sample would let the search
    clip it.
    """
    rows = x.reshape(-1, channels)
    if rows.shape[0] <= tokens:
        return np.ascontiguousarray(rows, dtype=np.float32)
    peak = np.abs(rows).max(axis=1)
    n_top = tokens // 8
    top = np.argsort(-peak, kind="stable")[:n_top]
    rest = np.setdiff1d(np.arange(rows.shape[0]), top)
    chosen = np.concatenate([top, rng.choice(rest, tokens - n_top, replace=False)])
    return np.ascontiguousarray(rows[np.sort(chosen)], dtype=np.float32)


def group_seed(seed: int, name: str) -> tuple[int, int]:
    """The seed of one group: depends on the seed and the group's name only, not on the order of work."""
    return seed, zlib.crc32(name.encode())


def group_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(list(group_seed(seed, name)))


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def layer_mse(x_q: np.ndarray, layers: tuple[LinearOperand, ...], scales: dict[str, np.ndarray],
              targets: list[np.ndarray], noise: np.ndarray | None = None) -> list[float]:
    """Per-layer output MSE of ``x_q dq(W) + B - N dq(W)`` against the float outputs."""
    out = []
    for layer, target in zip(layers, targets):
        w_q = layer.quantized_weight(scales[layer.name])
        bias = layer.bias if noise is None else layer.bias - noise @ w_q
        out.append(_mse(x_q @ w_q + bias, target))
    return out


def search_weight_scales(x_q: np.ndarray, x: np.ndarray, layer: LinearOperand, target: np.ndarray,
                         alphas: np.ndarray, stride: int = 1,
                         objective: Objective = Objective.COSINE) -> np.ndarray:
    """Per output channel, the step ``a * s_c^minmax`` whose channel output is most similar to the float one
    (cosine, or with ``objective`` Pearson: the same from column sums, :func:`similarity_of`).

    Channel ``c`` of the quantized layer errs by ``E_c = x_q D_c + F_c`` (``D = dq(W) - W``, ``F = (x_q - x) W``),
    so its cosine with ``t_c = x w_c + b_c`` follows from ``<E_c, t_c> = D_c . (x_q^T t)_c + <F_c, t_c>`` and
    ``||E_c||^2 = D_c^T (x_q^T x_q) D_c + 2 D_c . (x_q^T F)_c + ||F_c||^2``: a ``K x K x N`` product per
    candidate where ``K`` is below the token count ``T``, the ``T x K x N`` product ``x_q D`` elsewhere. The
    terms are small differences computed as such, so the cosine keeps its precision near 1. The grid is searched
    as :func:`grid_argmax` does, each channel around its own best coarse point.
    """
    base = layer.minmax_scales()
    w = layer.weight
    f = (x_q - x) @ w
    gram = x_q.T @ x_q if w.shape[0] < x_q.shape[0] else None
    if gram is not None:
        cross_t, cross_f = x_q.T @ target, x_q.T @ f
    t2 = colsum(target, target)
    f2, ft = colsum(f, f), colsum(f, target)
    rows = x_q.shape[0]
    t_sum, f_sum, xq_sum = (v.sum(axis=0, dtype=np.float64) for v in (target, f, x_q))

    def cosines(alpha: np.ndarray) -> np.ndarray:
        delta = layer.quantized_weight((base * alpha).astype(np.float32))
        delta -= w
        if gram is not None:
            e2 = colsum(delta, gram @ delta) + 2.0 * colsum(delta, cross_f) + f2
            et = colsum(delta, cross_t) + ft
        else:
            err = x_q @ delta
            err += f
            e2, et = colsum(err, err), colsum(err, target)
        if objective == Objective.COSINE:
            return cosine_of(t2, et, e2)
        return similarity_of(objective, t2, et, e2, t_sum, xq_sum @ delta + f_sum, rows)

    # grid_argmax per channel (the channels decouple): the coarse points, then each channel's own neighbours
    count = len(alphas)
    best, best_index = np.full(base.shape, -np.inf), np.zeros(base.shape, dtype=np.int64)
    for i in sorted({*range(0, count, stride), count - 1}):  # one fake-quantized weight alive at a time
        cos = cosines(np.full(base.shape, alphas[i]))
        better = cos > best
        best[better], best_index[better] = cos[better], i
    centre = best_index.copy()
    for offset in [o for o in range(1 - stride, stride) if o != 0]:
        index = centre + offset
        valid = (index >= 0) & (index < count) & (index % stride != 0) & (index != count - 1)
        if not valid.any():
            continue
        cos = np.where(valid, cosines(alphas[np.clip(index, 0, count - 1)]), -np.inf)
        better = (cos > best) | ((cos == best) & (index < best_index))
        best[better], best_index[better] = cos[better], index[better]
    return (base * alphas[best_index]).astype(np.float32)


def search_linear_group(problem: GroupSearch) -> GroupResult:
    """EasyQuant (and, with a ``noise_mode``, NoisyQuant) for one activation group of linear layers."""
    sample, layers = problem.sample, problem.layers
    if sample.absmax == 0:  # an all-zero input (e.g. a zero-initialized token): nothing to search
        zero = {"mse_minmax": 0.0, "mse_easyquant": 0.0} | ({"mse_noisyquant": 0.0} if problem.noise_mode else {})
        return GroupResult(1.0, {op.name: op.minmax_scales() for op in layers}, {op.name: dict(zero) for op in layers},
                           base_scale=1.0)
    targets = [sample.x @ layer.weight + layer.bias for layer in layers]
    easy, alpha, errors = _easyquant(problem, targets)
    if problem.noise_mode is None:
        return easy
    noise, scale, shift, amplitude = _search_noise(problem, targets, easy, alpha, errors)
    if sample.held_out is not None and np.any(noise) and not _wins_held_out(problem, easy, noise, scale):
        noise, scale, shift, amplitude = np.zeros_like(noise), easy.scale, 0.0, 0.0
    x_q = problem.act.fake_quant(sample.x + noise, scale)
    for layer, m in zip(layers, layer_mse(x_q, layers, easy.weight_scales, targets, noise)):
        easy.metrics[layer.name]["mse_noisyquant"] = m
    return dataclasses.replace(easy, scale=scale, noise=noise if np.any(noise) else None, noise_shift=shift,
                               noise_amplitude=amplitude)


def _easyquant(problem: GroupSearch, targets: list[np.ndarray]) -> tuple[GroupResult, float, list | None]:
    """EasyQuant's alternating search (module docstring), or MinMax where that has the lower output MSE; the result,
    its activation step as a multiple of the MinMax step, and the layers' :class:`LayerError` at the chosen weights
    (``None`` where MinMax was kept: they were built for other weights)."""
    x, layers, act, config = problem.sample.x, problem.layers, problem.act, problem.config
    base = act.minmax_scale(problem.sample.absmax)
    minmax = {layer.name: layer.minmax_scales() for layer in layers}
    mse_minmax = layer_mse(act.fake_quant(x, base), layers, minmax, targets)
    metrics = {layer.name: {"mse_minmax": m} for layer, m in zip(layers, mse_minmax)}
    alpha, scales = 1.0, dict(minmax)
    sub = screen_rows(x, config.screen_tokens)
    for _ in range(config.rounds):
        x_q = act.fake_quant(x, base * alpha)
        scales = {layer.name: search_weight_scales(x_q, x, layer, t, grid(config.weight_alphas), config.grid_stride,
                                                   config.objective)
                  for layer, t in zip(layers, targets)}
        errors = [LayerError.build(x, layer, layer.quantized_weight(scales[layer.name]), t)
                  for layer, t in zip(layers, targets)]
        alphas = grid(config.act_alphas)

        def similarity(i: int, rows: np.ndarray, errs: list[LayerError]) -> float:
            d = act.fake_quant(rows, base * alphas[i])
            d -= rows
            return float(np.mean([error.similarity(d, config.objective) for error in errs]))

        screen = None
        if sub is not None:
            screen = functools.partial(similarity, rows=x[sub[0]], errs=[error.rows(*sub) for error in errors])
        index, _ = grid_argmax(len(alphas), functools.partial(similarity, rows=x, errs=errors), config.grid_stride,
                               screen, config.screen_keep)
        alpha = float(alphas[index])
    easy = layer_mse(act.fake_quant(x, base * alpha), layers, scales, targets)
    if sum(easy) > sum(mse_minmax):
        # cosine ignores magnitude: a solution that lost to MinMax on output MSE is not kept
        alpha, scales, easy, errors = 1.0, minmax, mse_minmax, None
        for layer in layers:
            metrics[layer.name]["minmax_kept"] = 1.0
    for layer, m in zip(layers, easy):
        metrics[layer.name]["mse_easyquant"] = m
    scale = base * alpha
    return GroupResult(scale, scales, metrics, base_scale=scale), alpha, errors


def _wins_held_out(problem: GroupSearch, easy: GroupResult, noise: np.ndarray, scale: float) -> bool:
    """Whether ``noise`` at ``scale`` beats the noiseless EasyQuant step on rows no search fitted on (summed layer
    output MSE); records both errors per layer, and ``noise_rejected`` where it loses."""
    rows, layers, act = problem.sample.held_out, problem.layers, problem.act
    targets = [rows @ layer.weight + layer.bias for layer in layers]
    plain = layer_mse(act.fake_quant(rows, easy.scale), layers, easy.weight_scales, targets)
    noisy = layer_mse(act.fake_quant(rows + noise, scale), layers, easy.weight_scales, targets, noise)
    for layer, e, n in zip(layers, plain, noisy):
        easy.metrics[layer.name]["mse_easyquant_held_out"] = e
        easy.metrics[layer.name]["mse_noisyquant_held_out"] = n
    if sum(noisy) < sum(plain):
        return True
    for layer in layers:
        easy.metrics[layer.name]["noise_rejected"] = 1.0
    return False


def _search_noise(problem: GroupSearch, targets: list[np.ndarray], easy: GroupResult, alpha: float,
                  errors: list[LayerError] | None = None) -> tuple[np.ndarray, float, float, float]:
    """The ``(N, step, b, k)`` of the grid candidate with the lowest summed output MSE on the fit rows (the
    EasyQuant solution, ``N = 0``, is a candidate), its step then refined on the same objective."""
    sample, act, config = problem.sample, problem.act, problem.config
    qmax = act.code_range[1]
    u = np.random.default_rng(list(problem.noise_seed)).uniform(-0.5, 0.5, size=sample.x.shape[1])
    centre = (sample.channel_min.astype(np.float64) + sample.channel_max.astype(np.float64)) / 2.0
    if errors is None:  # EasyQuant's last round built them on the same rows and weights where it kept its own
        errors = [LayerError.build(sample.x, layer, layer.quantized_weight(easy.weight_scales[layer.name]), t)
                  for layer, t in zip(problem.layers, targets)]
    shifts, amplitudes = config.noise_grid(problem.noise_mode)
    if sample.calib_rows is not None and sample.calib_rows < config.shift_min_rows:
        shifts = (0.0,)

    def range_of(noise: np.ndarray) -> float:
        return float(np.max(np.maximum(np.abs(sample.channel_min + noise), np.abs(sample.channel_max + noise))))

    # first the rows a screen takes (the outliers that decide clipping among them), then the rest in turn
    screened = screen_rows(sample.x, sample.x.shape[0] // LOSS_PARTS)
    first_rows = screened[0] if screened is not None else np.arange(sample.x.shape[0])
    rest = np.setdiff1d(np.arange(sample.x.shape[0]), first_rows)
    parts = [first_rows] + [rest[j::LOSS_PARTS - 1] for j in range(LOSS_PARTS - 1)]
    part_rows = [sample.x[rows] for rows in parts]
    part_errors = [[error.rows(rows) for error in errors] for rows in parts]
    sizes = [error.size for error in errors]

    def loss_part(noise: np.ndarray, scale: float, j: int) -> float:
        """Part ``j``'s share of the summed layer output MSE: its rows' squared errors over all rows' count."""
        noisy = part_rows[j] + noise.astype(np.float32)
        d = act.fake_quant(noisy, scale)
        d -= noisy
        return float(sum(error.terms(d)[0] / size for error, size in zip(part_errors[j], sizes)))

    def lowest(trials: list[tuple[np.ndarray, float]]) -> tuple[int, float]:
        return additive_argmin(len(trials), lambda i, j: loss_part(*trials[i], j), LOSS_PARTS)

    zero = np.zeros_like(u)
    candidates = [(zero, easy.scale, 0.0, 0.0)]  # the EasyQuant solution itself
    for shift in shifts:
        shifted = -shift * centre
        step = alpha * range_of(shifted) / qmax
        for amplitude in amplitudes:
            noise = shifted + amplitude * step * u
            scale = alpha * range_of(noise) / qmax
            if scale > 0:  # else every channel constant and shifted onto zero: nothing to quantize
                candidates.append((noise, scale, float(shift), float(amplitude)))
    chosen, value = lowest([c[:2] for c in candidates])  # ties: the earliest, the EasyQuant solution first
    noise, scale, shift, amplitude = candidates[chosen]
    base, alphas = range_of(noise) / qmax, grid(config.act_alphas)
    if base > 0:
        if config.grid_stride == 1:
            i, trial = lowest([(noise, base * a) for a in alphas])
        else:
            i, negative = grid_argmax(len(alphas), lambda i: -sum(loss_part(noise, base * alphas[i], j)
                                                                  for j in range(LOSS_PARTS)), config.grid_stride)
            trial = -negative
        if trial < value:
            scale = base * alphas[i]
    return noise.astype(np.float32), float(scale), shift, amplitude


def search_act_matmul(a: np.ndarray, b: np.ndarray, absmax: tuple[float, float], quantizers: tuple,
                      config: SearchConfig, ranking: bool = False) -> tuple[float, float, dict]:
    """EasyQuant for ``A @ B`` with both operands quantized (per tensor, or ``A`` twin-uniform): alternate the two
    steps over each quantizer's candidates, on the cosine similarity of the product (PTQ4ViT scores with a
    Hessian-guided metric, which needs output gradients an ONNX model does not give: the product's cosine here).
    ``config.objective`` Pearson scores the product's correlation instead; with ``ranking`` (attention scores
    ``Q K^T``) and ``config.ranking_loss = gamma > 0`` a candidate scores ``similarity - gamma * ranking loss``
    (PTQ-ViT, :func:`ranking_loss` on ``config.ranking_pairs`` sampled pairs per query row)."""
    base = [q.minmax_scale(m) for q, m in zip(quantizers, absmax)]
    full = _ProductScore(a, b, quantizers, base, config, ranking)
    scales = list(base)
    metrics = {"mse_minmax": full.mse(0, base[0])}
    for _ in range(config.rounds):
        for which in (0, 1):
            candidates = quantizers[which].candidates(base[which], grid(config.act_alphas))
            index, _ = grid_argmax(len(candidates), lambda i: full.score(which, candidates[i]), config.grid_stride)
            scales[which] = candidates[index]
            full.set(which, scales[which])
    metrics["mse_easyquant"] = full.mse(0, scales[0])
    if metrics["mse_easyquant"] > metrics["mse_minmax"]:  # as for linear groups: never worse than MinMax
        scales, metrics["mse_easyquant"], metrics["minmax_kept"] = list(base), metrics["mse_minmax"], 1.0
    return scales[0], scales[1], metrics


class _ProductScore:
    """The similarity of ``q(A) @ q(B)`` with ``A @ B`` as one operand's step varies, the other's quantized at its
    current step (:meth:`set`).

    With ``B`` fixed at ``B_q`` and ``A`` quantized with error ``D``, the product errs by ``E = D B_q + C``
    (``C = A (B_q - B)``), which :class:`_OperandError` scores without forming ``E``; a varying ``B`` is the same
    problem transposed (``E^T = D^T A_q^T + B^T (A_q - A)^T``). The ranking loss needs the quantized scores
    themselves: with it, the product is formed; so it is where the algebra saves nothing (``A V``: the fixed
    operand's outer dimension is below the shared one)."""

    def __init__(self, a: np.ndarray, b: np.ndarray, quantizers: tuple, scales: list[float], config: SearchConfig,
                 ranking: bool) -> None:
        self.operands, self.quantizers, self.config = (a, b), quantizers, config
        self.target = a @ b
        self.t2, self.t_sum = dot(self.target, self.target), float(self.target.sum(dtype=np.float64))
        self.pairs = (ranking_pairs(self.target, config.ranking_pairs, np.random.default_rng(0))
                      if ranking and config.ranking_loss > 0 else None)
        self.quantized = [q.fake_quant(v, s) for q, v, s in zip(quantizers, self.operands, scales)]
        self._errors: dict[int, _OperandError] = {}

    def set(self, which: int, scale: float) -> None:
        self.quantized[which] = self.quantizers[which].fake_quant(self.operands[which], scale)
        self._errors.clear()

    def error(self, which: int, scale: float) -> np.ndarray:
        trial = list(self.quantized)
        trial[which] = self.quantizers[which].fake_quant(self.operands[which], scale)
        err = trial[0] @ trial[1]
        err -= self.target
        return err

    def mse(self, which: int, scale: float) -> float:
        err = self.error(which, scale)
        return dot(err, err) / self.target.size

    def score(self, which: int, scale: float) -> float:
        config, other = self.config, self.operands[1 - which]
        # the algebra pays where the fixed operand's outer dimension exceeds the shared one (Q K^T), not for A V
        outer, shared = (other.shape[-1], other.shape[-2]) if which == 0 else (other.shape[-2], other.shape[-1])
        direct = self.pairs is not None or outer <= shared
        if direct:
            err = self.error(which, scale)
            e2, et = dot(err, err), dot(err, self.target)
            e_sum = float(err.sum(dtype=np.float64))
        else:
            if which not in self._errors:
                self._errors[which] = _OperandError.build(self.operands, self.quantized, self.target, which)
            d = self.quantizers[which].fake_quant(self.operands[which], scale)
            d -= self.operands[which]
            e2, et, e_sum = self._errors[which].terms(d if which == 0 else np.swapaxes(d, -1, -2))
        if config.objective == Objective.COSINE:
            value = float(cosine_of(self.t2, et, e2))
        else:
            value = float(similarity_of(config.objective, self.t2, et, e2, self.t_sum, e_sum, self.target.size))
        if self.pairs is not None:
            err += self.target  # the quantized scores
            value -= config.ranking_loss * ranking_loss(err, self.pairs, config.ranking_margin)
        return value


@dataclasses.dataclass(frozen=True)
class _OperandError:
    """The error of a batched product ``L R`` (``[S, T, k] @ [S, k, m]``) whose right operand is fixed at ``R_q``
    and whose left one errs by ``D``: ``E = D R_q + C`` with ``C = L (R_q - R)``, so ::

        ||E||^2 = ||D R_q||^2 + 2 <D, C R_q^T> + ||C||^2,    <E, t> = <D, t R_q^T> + <C, t>,
        sum E = sum_(s,i,j) D_sij (R_q 1)_sj + sum C

    and ``||D R_q||^2 = <D G, D>`` with the ``k x k`` Gram matrices ``G = R_q R_q^T`` where ``k < m``: a candidate
    costs ``S T k min(k, m)`` instead of the product's ``S T k m`` (``Q K^T``: ``k`` = 64 head channels, ``m`` =
    the tokens). The same algebra as :class:`nq_onnx.objectives.LayerError`, per slice."""

    right: np.ndarray  # R_q, or G where k < m
    gram: bool
    c_rt: np.ndarray
    t_rt: np.ndarray
    c2: float
    ct: float
    r_sum: np.ndarray
    c_sum: float

    @classmethod
    def build(cls, operands: tuple, quantized: list, target: np.ndarray, which: int) -> "_OperandError":
        """For operand ``which`` varying: ``A`` as is, ``B`` through the transposed product."""
        t = lambda v: np.swapaxes(v, -1, -2)  # noqa: E731
        left, right, right_q = operands[0], operands[1], quantized[1]
        if which == 1:
            left, right, right_q, target = t(operands[1]), t(operands[0]), t(quantized[0]), t(target)
        c = left @ (right_q - right)
        gram = right_q.shape[-2] < right_q.shape[-1]
        return cls(right_q @ t(right_q) if gram else right_q, gram, c @ t(right_q), target @ t(right_q), dot(c, c),
                   dot(c, target), right_q.sum(axis=-1, dtype=np.float64), float(c.sum(dtype=np.float64)))

    def terms(self, d: np.ndarray) -> tuple[float, float, float]:
        """``(||E||^2, <E, t>, sum E)`` for the left operand's error ``d``."""
        p = d @ self.right
        dd = dot(p, d) if self.gram else dot(p, p)
        e_sum = float((d.sum(axis=-2, dtype=np.float64) * self.r_sum).sum()) + self.c_sum
        return dd + 2.0 * dot(d, self.c_rt) + self.c2, dot(d, self.t_rt) + self.ct, e_sum
