"""NoisyQuant's Theorem 1, computed: the expected error of quantizing ``x + N`` and removing ``N`` again.

The paper's claim is about one fixed quantizer (step ``s``, codes ``[lo, hi]``) and a value ``x``: with a noisy
bias ``N ~ U(-w/2, w/2)`` added before quantization and subtracted after (what the denoising bias does after the
matmul), the error is ``e(x + N)``, where ``e(u) = dq(q(u)) - u`` is the quantizer's error function, and its
expected square is an average of ``e^2`` over the noise interval::

    E_N[(dq(q(x + N)) - N - x)^2] = (1 / w) * integral_{x - w/2}^{x + w/2} e(u)^2 du        (w > 0)
                                  = e(x)^2                                                  (w = 0)

Inside the code range ``e`` is a sawtooth of period ``s``, so the integral has a closed form: in units of the
step (``t = u / s``) an antiderivative of ``(round(t) - t)^2`` is ``G(t) = m / 12 + (r^3 + 1/8) / 3`` with
``m = floor(t + 1/2)``, ``r = t - m``; beyond the range the error is linear (``hi - t``, ``lo - t``) and so is
its square's integral. Two consequences are the theorem's substance: with ``w = s`` the expected squared error
is ``s^2 / 12`` for every ``x`` inside the range (the noise "dithers" away where ``x`` sits in its bin), so it
*lowers* the error of values far from a quantization level (``|e(x)| > s / sqrt(12)``) and raises it for values
near one; and the expectation depends on ``x`` only through its position in the bin. Whether noise helps a
layer therefore depends on where its activations sit in their bins, which is what :func:`noise_width_curve`
measures on real activations beside this prediction.
"""

from __future__ import annotations

import numpy as np

from nq_onnx.core import quant


def _antiderivative(t: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """``A(t) = integral of e(tau)^2 d tau`` (up to a constant) for the unit-step quantizer with codes
    ``[lo, hi]``: ``G`` inside ``[lo - 1/2, hi + 1/2]``, the integral of ``(hi - t)^2`` / ``(lo - t)^2`` beyond."""
    t = np.asarray(t, dtype=np.float64)
    lower, upper = lo - 0.5, hi + 0.5
    inside = np.clip(t, lower, upper)
    m = np.floor(inside + 0.5)
    r = inside - m
    out = m / 12.0 + (r**3 + 0.125) / 3.0
    above = np.maximum(t - upper, 0.0)  # integral over (upper, t] of (tau - hi)^2 = ((t - hi)^3 - 1/8) / 3
    below = np.maximum(lower - t, 0.0)
    out = out + ((above + 0.5) ** 3 - 0.125) / 3.0 - ((below + 0.5) ** 3 - 0.125) / 3.0
    return out


def squared_error(x: np.ndarray, step: float, bits: int, signed: bool = True) -> np.ndarray:
    """``e(x)^2 = (dq(q(x)) - x)^2`` of the activation quantizer, in float64."""
    x64 = np.asarray(x, dtype=np.float64)
    return (quant.fake_quant(x, step, bits, signed).astype(np.float64) - x64) ** 2


def expected_noisy_error(x: np.ndarray, step: float, width: float, bits: int, signed: bool = True) -> np.ndarray:
    """``E_N[(dq(q(x + N)) - N - x)^2]`` for ``N ~ U(-width/2, width/2)``, per element of ``x`` (module docstring)."""
    if width <= 0:
        return squared_error(x, step, bits, signed)
    lo, hi = quant.code_range(bits, signed)
    t = np.asarray(x, dtype=np.float64) / step
    half = 0.5 * width / step
    integral = _antiderivative(t + half, lo, hi) - _antiderivative(t - half, lo, hi)
    return step**2 * integral / (2.0 * half)


def noise_width_curve(x: np.ndarray, step: float, bits: int, widths: np.ndarray, seeds: int = 5,
                      signed: bool = True) -> dict:
    """The theorem's prediction beside a measurement on activations ``x`` (``[tokens, channels]``), per noise
    width (in units of ``step``).

    ``predicted[i]``: the mean over ``x`` of :func:`expected_noisy_error` at ``widths[i] * step``.
    ``measured[i]``: as NoisyQuant deploys it, one fixed noise value per channel, ``N_c = w (u_c - 1/2)`` with
    ``u_c ~ U(0, 1)``, the mean of ``(dq(q(x + N)) - N - x)^2`` over all of ``x``; averaged over ``seeds`` draws
    of the vector (``measured_std`` is their spread). Both are in the units of ``x`` squared, and
    ``no_noise`` is the plain quantizer's mean squared error.
    """
    x = np.asarray(x, dtype=np.float32)
    x64 = x.astype(np.float64)
    predicted, measured, spread = [], [], []
    for width in np.asarray(widths, dtype=np.float64):
        predicted.append(float(np.mean(expected_noisy_error(x, step, width * step, bits, signed))))
        draws = []
        for seed in range(seeds):
            noise = (width * step * (np.random.default_rng(seed).random(x.shape[1]) - 0.5)).astype(np.float32)
            noisy = x + noise
            err = quant.fake_quant(noisy, step, bits, signed).astype(np.float64) - noisy.astype(np.float64)
            # (x + N) - N - x is float32 rounding, not quantization error: measure against the noisy input itself
            draws.append(float(np.mean(err**2)))
        measured.append(float(np.mean(draws)))
        spread.append(float(np.std(draws)))
    return {
        "widths": [float(w) for w in widths],
        "step": float(step),
        "bits": bits,
        "signed": signed,
        "predicted": predicted,
        "measured": measured,
        "measured_std": spread,
        "no_noise": float(np.mean(squared_error(x, step, bits, signed))),
        "values": int(x64.size),
        "seeds": seeds,
    }


def plot(curves: dict[str, dict], title: str = ""):
    """The figure of the report and the README: left, each layer's mean squared error against the noise width,
    relative to its plain quantizer (measured: dots with the seeds' spread; predicted: lines); right, the
    theorem for one value, ``E[e(x + N)^2] / s^2`` across two bins for a few widths. Returns the matplotlib
    figure (matplotlib is imported here, only when a figure is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, curve) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        base = curve["no_noise"]
        left.plot(curve["widths"], np.array(curve["predicted"]) / base, color=color, lw=1.2, label=name)
        left.errorbar(curve["widths"], np.array(curve["measured"]) / base,
                      yerr=np.array(curve["measured_std"]) / base, fmt="o", ms=3, color=color, capsize=2)
    left.axhline(1.0, color="black", lw=0.6, ls="--")
    left.set_xlabel("noise width w / step")
    left.set_ylabel("E[(dq(q(X+N)) - N - X)^2] / no-noise")
    left.set_title("real activations: theorem (lines) vs measured (dots)", fontsize=9)
    left.legend(fontsize=7)
    t = np.linspace(-0.5, 1.5, 801)
    for width in (0.0, 0.5, 1.0, 1.5):
        right.plot(t, expected_noisy_error(t.astype(np.float32), 1.0, width, 8), label=f"w = {width:g} step")
    right.axhline(1 / 12, color="black", lw=0.6, ls="--")
    right.set_xlabel("x / step (levels at 0 and 1)")
    right.set_ylabel("E[e(x + N)^2] / step^2")
    right.set_title("one value x: the expected error it gets", fontsize=9)
    right.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
