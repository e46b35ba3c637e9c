"""EasyQuant scale search and NoisyQuant noise search, on a sample of one group's input activations.

Both work on a token sample ``X`` (rows ``[T, K]``) of the group's input, taken after the already-planned
earlier layers were quantized, and on each consumer's float layer ``f_l(X) = X W_l + B_l``.

EasyQuant (Wu et al. 2020), alternating for ``rounds``: with the activation step fixed, each output
channel ``c`` of each layer picks ``s_c = a * s_c^minmax`` (``a`` on a grid) maximizing the cosine similarity
of that channel's quantized output with the float one; then the shared activation step ``s = a * s^minmax``
maximizes the mean cosine similarity of the layer outputs.

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
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from nq_onnx import quant
from nq_onnx.config import NoiseMode, SearchConfig


@dataclasses.dataclass
class LinearOperand:
    """A consumer of the group in ``X @ W + B`` layout: ``W`` is ``[K, N]`` whatever the graph stores."""

    name: str
    weight: np.ndarray
    bias: np.ndarray
    bits: int
    scales: np.ndarray | None = None

    def minmax_scales(self) -> np.ndarray:
        return quant.weight_scales(self.weight, axis=1, bits=self.bits)

    def quantized_weight(self) -> np.ndarray:
        return quant.fake_quant(self.weight, self.scales[None, :], self.bits)


@dataclasses.dataclass
class GroupResult:
    scale: float
    noise: np.ndarray | None
    noise_shift: float
    noise_amplitude: float
    metrics: dict[str, dict[str, float]]
    base_scale: float = 0.0  # the EasyQuant step, before any noise search


def grid(spec: tuple[float, float, int]) -> np.ndarray:
    low, high, count = spec
    return np.linspace(low, high, int(count), dtype=np.float64)


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


def group_rng(seed: int, name: str) -> np.random.Generator:
    """The generator of one group: depends on the seed and the group's name only, not on the order of work."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = np.linalg.norm(a64) * np.linalg.norm(b64)
    return float(a64 @ b64 / denom) if denom > 0 else 1.0


def _column_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = np.einsum("tn,tn->n", a, b, dtype=np.float64)
    den = np.sqrt(np.einsum("tn,tn->n", a, a, dtype=np.float64) * np.einsum("tn,tn->n", b, b, dtype=np.float64))
    return np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def layer_mse(
    x_q: np.ndarray, layers: list[LinearOperand], targets: list[np.ndarray], noise: np.ndarray | None = None
) -> list[float]:
    """Per-layer output MSE of ``x_q dq(W) + B - N dq(W)`` against the float outputs."""
    out = []
    for layer, target in zip(layers, targets):
        w_q = layer.quantized_weight()
        bias = layer.bias if noise is None else layer.bias - noise @ w_q
        out.append(_mse(x_q @ w_q + bias, target))
    return out


def search_weight_scales(x_q: np.ndarray, layer: LinearOperand, target: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    base = layer.minmax_scales()
    best = np.full(base.shape, -np.inf)
    best_alpha = np.ones(base.shape)
    for alpha in alphas:  # one fake-quantized weight alive at a time: weights can be hundreds of MB
        scales = (base * alpha)[None, :].astype(np.float32)
        cos = _column_cosine(x_q @ quant.fake_quant(layer.weight, scales, layer.bits) + layer.bias, target)
        better = cos > best
        best[better], best_alpha[better] = cos[better], alpha
    return (base * best_alpha).astype(np.float32)


def search_linear_group(
    x: np.ndarray,
    absmax: float,
    layers: list[LinearOperand],
    a_bits: int,
    config: SearchConfig,
    noise_mode: NoiseMode | None,
    channel_min: np.ndarray,
    channel_max: np.ndarray,
    rng: np.random.Generator,
    signed: bool = True,
    calib_rows: int | None = None,
    held_out: np.ndarray | None = None,
) -> GroupResult:
    """EasyQuant (and, with a ``noise_mode``, NoisyQuant) for one activation group of linear layers.

    ``signed = False`` (a non-negative input, never with noise) quantizes to unsigned codes. ``calib_rows``
    is how many rows the per-channel ranges were calibrated on (``None``: enough to centre on). ``held_out``:
    rows ``[T', K]`` of other images, on which a noise must beat EasyQuant to be kept.
    """
    with_noise = noise_mode is not None
    if with_noise and not signed:
        raise ValueError("a noisy group is quantized signed: X + N can be negative")
    if absmax == 0:  # an all-zero input (e.g. a zero-initialized token): nothing to search
        for layer in layers:
            layer.scales = layer.minmax_scales()
        zero = {"mse_minmax": 0.0, "mse_easyquant": 0.0} | ({"mse_noisyquant": 0.0} if with_noise else {})
        return GroupResult(1.0, None, 0.0, 0.0, {layer.name: dict(zero) for layer in layers}, 1.0)
    targets = [x @ layer.weight + layer.bias for layer in layers]
    base = float(quant.minmax_scale(absmax, a_bits, signed))
    for layer in layers:
        layer.scales = layer.minmax_scales()
    metrics = {
        layer.name: {"mse_minmax": m}
        for layer, m in zip(layers, layer_mse(quant.fake_quant(x, base, a_bits, signed), layers, targets))
    }

    alpha = 1.0
    for _ in range(config.rounds):
        x_q = quant.fake_quant(x, np.float32(base * alpha), a_bits, signed)
        for layer, target in zip(layers, targets):
            layer.scales = search_weight_scales(x_q, layer, target, grid(config.weight_alphas))
        w_q = [layer.quantized_weight() for layer in layers]
        best = -np.inf
        for candidate in grid(config.act_alphas):
            x_q = quant.fake_quant(x, np.float32(base * candidate), a_bits, signed)
            score = float(np.mean([_cosine(x_q @ w + layer.bias, t) for w, layer, t in zip(w_q, layers, targets)]))
            if score > best:
                best, alpha = score, float(candidate)
    scale = base * alpha
    easy = layer_mse(quant.fake_quant(x, np.float32(scale), a_bits, signed), layers, targets)
    if sum(easy) > sum(metrics[layer.name]["mse_minmax"] for layer in layers):
        # cosine ignores magnitude: a solution that lost to MinMax on output MSE is not kept
        alpha, scale = 1.0, base
        for layer in layers:
            layer.scales = layer.minmax_scales()
            metrics[layer.name]["minmax_kept"] = 1.0
        easy = [metrics[layer.name]["mse_minmax"] for layer in layers]
    for layer, m in zip(layers, easy):
        metrics[layer.name]["mse_easyquant"] = m
    if not with_noise:
        return GroupResult(scale, None, 0.0, 0.0, metrics, scale)

    base_step = scale
    shifts, amplitudes = config.noise_grid(noise_mode)
    if calib_rows is not None and calib_rows < config.shift_min_rows:
        shifts = (0.0,)
    noise, scale, shift, amplitude = _search_noise(
        x, layers, targets, a_bits, alpha, channel_min, channel_max, rng, scale, shifts, amplitudes,
        grid(config.act_alphas)
    )
    if held_out is not None and np.any(noise) and not _wins_held_out(held_out, layers, a_bits, noise, scale,
                                                                      base_step, metrics):
        noise, scale, shift, amplitude = np.zeros_like(noise), base_step, 0.0, 0.0
    x_q = quant.fake_quant(x + noise, np.float32(scale), a_bits)
    for layer, m in zip(layers, layer_mse(x_q, layers, targets, noise)):
        metrics[layer.name]["mse_noisyquant"] = m
    return GroupResult(scale, noise if np.any(noise) else None, shift, amplitude, metrics, base_scale=base_step)


def _wins_held_out(rows, layers, a_bits, noise, scale, easy_scale, metrics) -> bool:
    """Whether ``noise`` at ``scale`` beats the noiseless EasyQuant step on rows no search fitted on (summed layer
    output MSE); records both errors per layer, and ``noise_rejected`` where it loses."""
    targets = [rows @ layer.weight + layer.bias for layer in layers]
    easy = layer_mse(quant.fake_quant(rows, np.float32(easy_scale), a_bits), layers, targets)
    noisy = layer_mse(quant.fake_quant(rows + noise, np.float32(scale), a_bits), layers, targets, noise)
    for layer, e, n in zip(layers, easy, noisy):
        metrics[layer.name]["mse_easyquant_held_out"] = e
        metrics[layer.name]["mse_noisyquant_held_out"] = n
    if sum(noisy) < sum(easy):
        return True
    for layer in layers:
        metrics[layer.name]["noise_rejected"] = 1.0
    return False


def _search_noise(x, layers, targets, a_bits, alpha, channel_min, channel_max, rng, easy_scale, shifts, amplitudes,
                  act_alphas):
    qmax = quant.qmax(a_bits)
    u = rng.uniform(-0.5, 0.5, size=x.shape[1]).astype(np.float64)
    centre = (channel_min.astype(np.float64) + channel_max.astype(np.float64)) / 2.0
    w_q = [layer.quantized_weight() for layer in layers]

    def range_of(noise: np.ndarray) -> float:
        return float(np.max(np.maximum(np.abs(channel_min + noise), np.abs(channel_max + noise))))

    def loss(noise: np.ndarray, scale: float) -> float:
        n32 = noise.astype(np.float32)
        x_q = quant.fake_quant(x + n32, np.float32(scale), a_bits)
        return float(sum(_mse(x_q @ w + (layer.bias - n32 @ w), t) for w, layer, t in zip(w_q, layers, targets)))

    zero = np.zeros_like(u)
    best = (loss(zero, easy_scale), zero, easy_scale, 0.0, 0.0)  # the EasyQuant solution itself
    for shift in shifts:
        shifted = -shift * centre
        step = alpha * range_of(shifted) / qmax
        for amplitude in amplitudes:
            noise = shifted + amplitude * step * u
            scale = alpha * range_of(noise) / qmax
            if not scale > 0:  # every channel constant and shifted onto zero: nothing to quantize
                continue
            value = loss(noise, scale)
            if value < best[0]:
                best = (value, noise, scale, float(shift), float(amplitude))
    value, noise, scale, shift, amplitude = best
    base = range_of(noise) / qmax
    for candidate in act_alphas if base > 0 else ():
        trial = loss(noise, base * candidate)
        if trial < value:
            value, scale = trial, base * candidate
    return noise.astype(np.float32), float(scale), shift, amplitude


def search_act_matmul(
    a: np.ndarray,
    b: np.ndarray,
    absmax: tuple[float, float],
    bits: int,
    config: SearchConfig,
    signed: tuple[bool, bool] = (True, True),
) -> tuple[float, float, dict]:
    """EasyQuant for ``A @ B`` with both operands per-tensor quantized: alternate the two steps."""
    target = a @ b
    base = [float(quant.minmax_scale(m, bits, s)) for m, s in zip(absmax, signed)]

    def product(scales: list[float]) -> np.ndarray:
        return quant.fake_quant(a, np.float32(scales[0]), bits, signed[0]) @ quant.fake_quant(
            b, np.float32(scales[1]), bits, signed[1]
        )

    scales = list(base)
    metrics = {"mse_minmax": _mse(product(base), target)}
    for _ in range(config.rounds):
        for which in (0, 1):
            best = -np.inf
            for candidate in grid(config.act_alphas):
                trial = list(scales)
                trial[which] = base[which] * candidate
                score = _cosine(product(trial), target)
                if score > best:
                    best, chosen = score, trial[which]
            scales[which] = chosen
    metrics["mse_easyquant"] = _mse(product(scales), target)
    if metrics["mse_easyquant"] > metrics["mse_minmax"]:  # as for linear groups: never worse than MinMax
        scales, metrics["mse_easyquant"], metrics["minmax_kept"] = list(base), metrics["mse_minmax"], 1.0
    return scales[0], scales[1], metrics
