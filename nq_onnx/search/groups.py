"""EasyQuant scale search and NoisyQuant noise search, on a sample of one group's input activations.

Both work on a token sample ``X`` (rows ``[T, K]``) of the group's input, taken after the already-planned
earlier layers were quantized, and on each consumer's float layer ``f_l(X) = X W_l + B_l``.

EasyQuant (Wu et al. 2020), alternating for ``rounds``: with the activation step fixed, each output
channel ``c`` of each layer picks ``s_c = a * s_c^minmax`` (``a`` on a grid) maximizing the cosine similarity
of that channel's quantized output with the float one; then the shared activation step ``s = a * s^minmax``
maximizes the mean cosine similarity of the layer outputs. With ``SearchConfig.objective`` Pearson (PTQ-ViT's
similarity-aware search) both maximize the Pearson correlation instead (:mod:`nq_onnx.search.objectives`). The
activation step's candidates are screened on a stratified quarter of the rows, the best few scored on all of them
(``SearchConfig.screen_tokens``, :func:`nq_onnx.search.grids.grid_argmax`); the noise search's summed MSE is minimized
part by part over the rows (:func:`nq_onnx.search.grids.additive_argmin`: the same choice as scoring every candidate).

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
quantization it scores is a :mod:`nq_onnx.core.quantizers` quantizer's, the same the simulation and the passes use.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import numpy as np

from nq_onnx.core.config import NoiseMode, Objective, SearchConfig
from nq_onnx.search.grids import LOSS_PARTS, additive_argmin, grid, grid_argmax, screen_rows
from nq_onnx.search.objectives import LayerError, colsum, cosine_of, similarity_of
from nq_onnx.core.quant import denoising_delta
from nq_onnx.core.quantizers import ActQuantizer, WeightQuantizer
from nq_onnx.core.timing import timed
from nq_onnx.passes.find_layers import LayerSpec


DELTA_CACHE_BYTES = 128 << 20  # per layer: EasyQuant's rounds share a weight's quantization errors up to this size


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


def linear_operand(spec: LayerSpec, weight: np.ndarray, tensors: dict, bits: int,
                   pair_limit: int | None = None) -> LinearOperand:
    """The layer as ``X @ W + B`` (the canonical ``MatMul`` layout; a layer without a bias has ``B = 0``), its
    weight quantized at ``bits`` (within the kernel pairs' ``pair_limit`` where given)."""
    bias = np.zeros(spec.out_features, np.float32)
    if spec.bias is not None:
        bias = tensors[spec.bias].values.astype(np.float32)
    return LinearOperand(spec.name, np.ascontiguousarray(weight, dtype=np.float32), bias,
                         WeightQuantizer(bits, pair_limit))


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
        if self.noise_mode is not None and not (self.act.signed or self.act.asymmetric):
            raise ValueError("a noisy group is quantized signed or asymmetric: X + N can be negative")


@dataclasses.dataclass
class GroupResult:
    scale: float
    weight_scales: dict[str, np.ndarray]
    metrics: dict[str, dict[str, float]]
    noise: np.ndarray | None = None
    noise_shift: float = 0.0
    noise_amplitude: float = 0.0
    base_scale: float = 0.0  # the EasyQuant step, before any noise search
    # wall seconds per phase of the search, for the conversion's profile (not part of the result): weight_steps
    # (per-channel weight steps), error_terms (each layer's LayerError), act_steps (EasyQuant's activation step),
    # noise (the noise grid and its step), held_out (the noise's check on held-out rows); the rest is not split
    seconds: dict[str, float] = dataclasses.field(default_factory=dict, compare=False)


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


def search_sample(value: np.ndarray, channels: int, tokens: int, rng: np.random.Generator, read: tuple[int, ...] = (),
                  share: float = 0.0) -> np.ndarray:
    """At most ``tokens`` rows of ``value`` for a search (:func:`sample_rows`). Where the output reads the token
    positions ``read`` of ``value`` (``[images, T, C]``), their ``n`` rows take ``share`` of the sample, each there
    ``r = round(share m / n)`` times (at least once; ``m`` the sample's size, ``tokens`` or every row if fewer),
    and :func:`sample_rows` draws the other ``m - r n`` from the other tokens. The searches' objectives are sums
    over rows, so a row there ``r`` times counts ``r`` times."""
    if not read or share <= 0 or value.ndim != 3:
        return sample_rows(value, channels, tokens, rng)
    rows = value[:, list(read), :].reshape(-1, channels).astype(np.float32)
    size = min(tokens, value.shape[0] * value.shape[1])
    copies = max(1, round(share * size / rows.shape[0]))
    others = np.delete(value, list(read), axis=1)
    rest = sample_rows(others, channels, max(size - copies * rows.shape[0], 1), rng)
    return np.concatenate([rest, np.tile(rows, (copies, 1))])


def group_seed(seed: int, name: str) -> tuple[int, int]:
    """The seed of one group: depends on the seed and the group's name only, not on the order of work."""
    return seed, zlib.crc32(name.encode())


def group_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(list(group_seed(seed, name)))


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    d = np.subtract(a, b, dtype=np.float64)
    np.multiply(d, d, out=d)
    return float(np.mean(d))


def layer_mse(x_q: np.ndarray, layers: tuple[LinearOperand, ...], weights: list[np.ndarray],
              targets: list[np.ndarray], noise: np.ndarray | None = None) -> list[float]:
    """Per-layer output MSE of ``x_q dq(W) + B - N dq(W)`` against the float outputs (``weights``: each layer's
    ``dq(W)``)."""
    out = []
    for layer, w_q, target in zip(layers, weights, targets):
        bias = layer.bias if noise is None else layer.bias + denoising_delta(noise, w_q)
        out.append(_mse(x_q @ w_q + bias, target))
    return out


def search_weight_scales(x_q: np.ndarray, x: np.ndarray, layer: LinearOperand, target: np.ndarray,
                         alphas: np.ndarray, stride: int = 1, objective: Objective = Objective.COSINE,
                         deltas: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """Per output channel, the step ``a * s_c^minmax`` whose channel output is most similar to the float one
    (cosine, or with ``objective`` Pearson: the same from column sums, :func:`similarity_of`).

    Channel ``c`` of the quantized layer errs by ``E_c = x_q D_c + F_c`` (``D = dq(W) - W``, ``F = (x_q - x) W``),
    so its cosine with ``t_c = x w_c + b_c`` follows from ``<E_c, t_c> = D_c . (x_q^T t)_c + <F_c, t_c>`` and
    ``||E_c||^2 = D_c^T (x_q^T x_q) D_c + 2 D_c . (x_q^T F)_c + ||F_c||^2``: a ``K x K x N`` product per
    candidate where ``K`` is below the token count ``T``, the ``T x K x N`` product ``x_q D`` elsewhere. The
    terms are small differences computed as such, so the cosine keeps its precision near 1. The grid is searched
    as :func:`grid_argmax` does, each channel around its own best coarse point. ``deltas`` keeps the coarse points'
    ``D`` by grid index across calls (they do not depend on ``x_q``: EasyQuant's later rounds reuse them).
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

    def cosines(alpha: np.ndarray, index: int | None = None) -> np.ndarray:
        delta = None if deltas is None or index is None else deltas.get(index)
        if delta is None:
            delta = layer.quantized_weight((base * alpha).astype(np.float32))
            delta -= w
            if deltas is not None and index is not None:
                deltas[index] = delta
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
    for i in sorted({*range(0, count, stride), count - 1}):  # one fake-quantized weight alive, unless ``deltas``
        cos = cosines(np.full(base.shape, alphas[i]), i)
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
    seconds: dict[str, float] = {}
    targets = [sample.x @ layer.weight + layer.bias for layer in layers]
    easy, alpha, errors, weights = _easyquant(problem, targets, seconds)
    easy.seconds = seconds  # the same dict: the noise phases below add to it
    if problem.noise_mode is None:
        return easy
    with timed(seconds, "noise"):
        noise, scale, shift, amplitude = _search_noise(problem, targets, easy, alpha, weights, errors)
    if sample.held_out is not None and np.any(noise):
        with timed(seconds, "held_out"):
            wins = _wins_held_out(problem, easy, weights, noise, scale)
        if not wins:
            noise, scale, shift, amplitude = np.zeros_like(noise), easy.scale, 0.0, 0.0
    x_q = problem.act.fake_quant(sample.x + noise, scale)
    for layer, m in zip(layers, layer_mse(x_q, layers, weights, targets, noise)):
        easy.metrics[layer.name]["mse_noisyquant"] = m
    return dataclasses.replace(easy, scale=scale, noise=noise if np.any(noise) else None, noise_shift=shift,
                               noise_amplitude=amplitude)


def held_out_error(problem: GroupSearch, result: GroupResult) -> float:
    """The summed layer output MSE of a searched group on its held-out rows (nearest-rounded weights at the searched
    steps, the denoising bias where it has noise): how two quantizers of one group compare on rows no search saw."""
    rows, layers = problem.sample.held_out, problem.layers
    noise = result.noise if result.noise is not None else np.zeros(rows.shape[1], np.float32)
    x_q = problem.act.fake_quant(rows + noise, result.scale)
    weights = [layer.quantized_weight(result.weight_scales[layer.name]) for layer in layers]
    targets = [rows @ layer.weight + layer.bias for layer in layers]
    return float(sum(layer_mse(x_q, layers, weights, targets, result.noise)))


def search_with_fallback(problem: GroupSearch, fallback: ActQuantizer,
                         names: tuple[str, str] = ("asymmetric", "symmetric"),
                         fallback_shifts: tuple[float, ...] | None = None) -> tuple[GroupSearch, GroupResult]:
    """The group searched with its quantizer and, where it has held-out rows, with ``fallback`` (the uniform
    quantizer an asymmetric or twin-uniform one replaces) too, its noise's mean shift on the grid
    ``fallback_shifts`` where one is given: the quantizer with the lower :func:`held_out_error` is kept (ties: the
    group's own), both errors are recorded in every layer's metrics as ``mse_<name>_held_out`` (``names``: the
    group's quantizer's, then the fallback's), and ``<name>_rejected`` where the fallback won."""
    result = search_linear_group(problem)
    if problem.sample.held_out is None:
        return problem, result
    other_problem = dataclasses.replace(problem, act=fallback)
    if fallback_shifts is not None:
        other_problem = dataclasses.replace(
            other_problem, config=dataclasses.replace(problem.config, noise_shifts=fallback_shifts))
    other = search_linear_group(other_problem)
    own, base = held_out_error(problem, result), held_out_error(other_problem, other)
    kept_problem, kept = (problem, result) if own <= base else (other_problem, other)
    for metrics in kept.metrics.values():
        metrics |= {f"mse_{names[0]}_held_out": own, f"mse_{names[1]}_held_out": base}
        if kept is other:
            metrics[f"{names[0]}_rejected"] = 1.0
    for phase, seconds in (result if kept is other else other).seconds.items():  # both searches' time counts
        kept.seconds[phase] = kept.seconds.get(phase, 0.0) + seconds
    return kept_problem, kept


def _easyquant(problem: GroupSearch, targets: list[np.ndarray],
               seconds: dict[str, float]) -> tuple[GroupResult, float, list | None, list]:
    """EasyQuant's alternating search (module docstring), or MinMax where that has the lower output MSE; the result,
    its activation step as a multiple of the MinMax step, the layers' :class:`LayerError` at the chosen weights
    (``None`` where MinMax was kept: they were built for other weights) and those weights ``dq(W)``."""
    x, layers, act, config = problem.sample.x, problem.layers, problem.act, problem.config
    base = act.minmax_scale(problem.sample.absmax)
    minmax = {layer.name: layer.minmax_scales() for layer in layers}
    minmax_weights = [layer.quantized_weight(minmax[layer.name]) for layer in layers]
    mse_minmax = layer_mse(act.fake_quant(x, base), layers, minmax_weights, targets)
    metrics = {layer.name: {"mse_minmax": m} for layer, m in zip(layers, mse_minmax)}
    alpha, scales, weights = 1.0, dict(minmax), minmax_weights
    sub = screen_rows(x, config.screen_tokens)
    sub_x = None if sub is None else x[sub[0]]
    weight_alphas = grid(config.weight_alphas)
    deltas = {layer.name: {} if config.rounds > 1 and len(weight_alphas) * layer.weight.nbytes <= DELTA_CACHE_BYTES
              else None for layer in layers}
    for _ in range(config.rounds):
        with timed(seconds, "weight_steps"):
            x_q = act.fake_quant(x, base * alpha)
            scales = {layer.name: search_weight_scales(x_q, x, layer, t, weight_alphas, config.grid_stride,
                                                       config.objective, deltas[layer.name])
                      for layer, t in zip(layers, targets)}
            weights = [layer.quantized_weight(scales[layer.name]) for layer in layers]
        with timed(seconds, "error_terms"):
            errors = [LayerError.build(x, layer, w_q, t) for layer, w_q, t in zip(layers, weights, targets)]
        alphas = grid(config.act_alphas)

        def similarity(i: int, rows: np.ndarray, errs: list[LayerError]) -> float:
            d = act.fake_quant(rows, base * alphas[i])
            d -= rows
            return float(np.mean([error.similarity(d, config.objective) for error in errs]))

        screen = None
        with timed(seconds, "act_steps"):
            if sub is not None:
                screen = functools.partial(similarity, rows=sub_x, errs=[error.rows(*sub) for error in errors])
            index, _ = grid_argmax(len(alphas), functools.partial(similarity, rows=x, errs=errors),
                                   config.grid_stride, screen, config.screen_keep)
        alpha = float(alphas[index])
    easy = layer_mse(act.fake_quant(x, base * alpha), layers, weights, targets)
    if sum(easy) > sum(mse_minmax):
        # cosine ignores magnitude: a solution that lost to MinMax on output MSE is not kept
        alpha, scales, easy, errors, weights = 1.0, minmax, mse_minmax, None, minmax_weights
        for layer in layers:
            metrics[layer.name]["minmax_kept"] = 1.0
    for layer, m in zip(layers, easy):
        metrics[layer.name]["mse_easyquant"] = m
    scale = base * alpha
    return GroupResult(scale, scales, metrics, base_scale=scale), alpha, errors, weights


def _wins_held_out(problem: GroupSearch, easy: GroupResult, weights: list[np.ndarray], noise: np.ndarray,
                   scale: float) -> bool:
    """Whether ``noise`` at ``scale`` beats the noiseless EasyQuant step on rows no search fitted on (summed layer
    output MSE, the layers' weights ``dq(W)`` the EasyQuant ones); records both errors per layer, and
    ``noise_rejected`` where it loses."""
    rows, layers, act = problem.sample.held_out, problem.layers, problem.act
    targets = [rows @ layer.weight + layer.bias for layer in layers]
    plain = layer_mse(act.fake_quant(rows, easy.scale), layers, weights, targets)
    noisy = layer_mse(act.fake_quant(rows + noise, scale), layers, weights, targets, noise)
    for layer, e, n in zip(layers, plain, noisy):
        easy.metrics[layer.name]["mse_easyquant_held_out"] = e
        easy.metrics[layer.name]["mse_noisyquant_held_out"] = n
    if sum(noisy) < sum(plain):
        return True
    for layer in layers:
        easy.metrics[layer.name]["noise_rejected"] = 1.0
    return False


def _search_noise(problem: GroupSearch, targets: list[np.ndarray], easy: GroupResult, alpha: float,
                  weights: list[np.ndarray], errors: list[LayerError] | None = None
                  ) -> tuple[np.ndarray, float, float, float]:
    """The ``(N, step, b, k)`` of the grid candidate with the lowest summed output MSE on the fit rows (the
    EasyQuant solution, ``N = 0``, is a candidate), its step then refined on the same objective."""
    if errors is None:  # EasyQuant's last round built them on the same rows and weights where it kept its own
        errors = [LayerError.build(problem.sample.x, layer, w_q, t)
                  for layer, w_q, t in zip(problem.layers, weights, targets)]
    loss = _NoiseLoss.build(problem.sample.x, problem.act, errors)
    candidates = _noise_candidates(problem, easy.scale, alpha)
    chosen, value = loss.lowest([c[:2] for c in candidates])  # ties: the earliest, the EasyQuant solution first
    noise, scale, shift, amplitude = candidates[chosen]
    scale = _refine_noisy_step(problem, loss, noise, scale, value)
    return noise.astype(np.float32), float(scale), shift, amplitude


@dataclasses.dataclass(frozen=True)
class _NoiseLoss:
    """The noise search's objective: the summed layer output MSE on the fit rows ``X`` with ``X + N`` quantized at
    step ``s`` and the denoising bias ``B - N dq(W_l)`` (:class:`~nq_onnx.search.objectives.LayerError`) ::

        L(N, s) = sum_l ||D dq(W_l) + X (dq(W_l) - W_l)||^2 / |Y_l|,      D = dq(q(X + N)) - (X + N)

    kept in ``LOSS_PARTS`` disjoint parts of the rows (the rows a screen takes first: the outliers that decide
    clipping among them; then the rest in turn), each part's share divided by every row's count, so that the parts
    sum to ``L`` and :func:`~nq_onnx.search.grids.additive_argmin` drops a candidate before it has scored every part."""

    act: ActQuantizer
    rows: list[np.ndarray]
    errors: list[list[LayerError]]
    sizes: list[float]

    @classmethod
    def build(cls, x: np.ndarray, act: ActQuantizer, errors: list[LayerError]) -> "_NoiseLoss":
        screened = screen_rows(x, x.shape[0] // LOSS_PARTS)
        first_rows = screened[0] if screened is not None else np.arange(x.shape[0])
        rest = np.setdiff1d(np.arange(x.shape[0]), first_rows)
        parts = [first_rows] + [rest[j::LOSS_PARTS - 1] for j in range(LOSS_PARTS - 1)]
        return cls(act, [x[rows] for rows in parts], [[error.rows(rows) for error in errors] for rows in parts],
                   [error.size for error in errors])

    def part(self, noise: np.ndarray, scale: float, j: int) -> float:
        """Part ``j``'s share of ``L(N, s)``: its rows' squared errors over all rows' count."""
        noisy = self.rows[j] + noise.astype(np.float32)
        d = self.act.fake_quant(noisy, scale)
        d -= noisy
        return float(sum(error.terms(d)[0] / size for error, size in zip(self.errors[j], self.sizes)))

    def __call__(self, noise: np.ndarray, scale: float) -> float:
        return sum(self.part(noise, scale, j) for j in range(LOSS_PARTS))

    def lowest(self, trials: list[tuple[np.ndarray, float]]) -> tuple[int, float]:
        """The index of the trial ``(N, s)`` with the lowest loss (ties: the earliest) and that loss."""
        return additive_argmin(len(trials), lambda i, j: self.part(*trials[i], j), LOSS_PARTS)


def _noisy_range(problem: GroupSearch, noise: np.ndarray) -> float:
    """The extent a MinMax step must cover for ``X + N`` (:meth:`ActQuantizer.extent`), from the calibrated
    per-channel ranges."""
    sample = problem.sample
    return problem.act.extent(float(np.min(sample.channel_min + noise)), float(np.max(sample.channel_max + noise)))


def _noise_candidates(problem: GroupSearch, easy_scale: float,
                      alpha: float) -> list[tuple[np.ndarray, float, float, float]]:
    """The noise grid's candidates ``(N, s, b, k)``, the EasyQuant solution ``(0, s_easy, 0, 0)`` first ::

        N = -b c + k s_b u,    s_b = alpha range(X - b c) / levels,    s = alpha range(X + N) / levels

    with ``c`` the per-channel mid-range, ``u ~ U(-1/2, 1/2)^K`` drawn from the group's noise seed and ``alpha``
    EasyQuant's multiple of the MinMax step; ``b > 0`` only where the ranges were calibrated on at least
    ``shift_min_rows`` rows, and no candidate whose ``X + N`` has nothing to quantize (``s = 0``)."""
    sample, config, levels = problem.sample, problem.config, problem.act.levels
    u = np.random.default_rng(list(problem.noise_seed)).uniform(-0.5, 0.5, size=sample.x.shape[1])
    centre = (sample.channel_min.astype(np.float64) + sample.channel_max.astype(np.float64)) / 2.0
    shifts, amplitudes = config.noise_grid(problem.noise_mode)
    if sample.calib_rows is not None and sample.calib_rows < config.shift_min_rows:
        shifts = (0.0,)
    candidates = [(np.zeros_like(u), easy_scale, 0.0, 0.0)]
    for shift in shifts:
        shifted = -shift * centre
        step = alpha * _noisy_range(problem, shifted) / levels
        for amplitude in amplitudes:
            noise = shifted + amplitude * step * u
            scale = alpha * _noisy_range(problem, noise) / levels
            if scale > 0:  # else every channel constant and shifted onto zero: nothing to quantize
                candidates.append((noise, scale, float(shift), float(amplitude)))
    return candidates


def _refine_noisy_step(problem: GroupSearch, loss: _NoiseLoss, noise: np.ndarray, scale: float,
                       value: float) -> float:
    """The step for ``X + N`` among ``a range(X + N) / levels`` (``a`` on the activation grid) with the lowest
    ``L(N, s)``, where that is below ``value`` (the loss at ``scale``); else ``scale``."""
    config = problem.config
    base, alphas = _noisy_range(problem, noise) / problem.act.levels, grid(config.act_alphas)
    if base <= 0:
        return scale
    if config.grid_stride == 1:
        i, trial = loss.lowest([(noise, base * a) for a in alphas])
    else:
        i, negative = grid_argmax(len(alphas), lambda i: -loss(noise, base * alphas[i]), config.grid_stride)
        trial = -negative
    return base * alphas[i] if trial < value else scale
