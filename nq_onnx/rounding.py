"""Second-order weight rounding (GPTQ) and bias correction: what a layer does after its steps are chosen.

**GPTQ** (Frantar et al. 2023, after OBQ): with the layer's input rows ``X`` (``[T, K]``, ``X + N`` where the layer
takes noise) and ``H = X^T X + lambda I`` (``lambda`` = ``damp`` x the mean diagonal), the codes of a ``[K, N]`` weight
are chosen input channel by input channel, ``k = 0 .. K-1``, each rounding error pushed onto the channels not yet
rounded so that ``X W`` moves as little as possible::

    q_k = clip(rint(W_k / s), lo, hi)               (per output channel steps s, fixed by the search)
    e_k = (W_k - s q_k) / U_kk
    W_j -= U_kj e_k            for j > k            (U: the upper Cholesky factor of H^-1)

in blocks of ``block`` channels with the update of the later blocks deferred (the same arithmetic, fewer passes).
Only the integer codes change: the graph stays plain QDQ with the same steps. A channel never active in ``X``
(``H_kk = 0``) is rounded to the nearest code.

**GPTQ on the quantized input** (``gptq-act``; the asymmetric calibration of GPTQv2 / GPTAQ, Li et al. 2025, with
the layer's own activation quantizer as the asymmetry): GPTQ fits ``X W`` from the same ``X``, but the layer runs on
its quantized input ``X^ = dq(q(X + N)) - N``. The error that matters, ``||X W - X^ W_q||``, splits exactly (for
``mu = 0``; ``W*`` is then the least-squares fit of ``X W`` from ``X^``)::

    W* = W + (X^T X^ + mu I)^-1 X^T (X - X^) W        (X^T here means X^'s transpose)
    ||X W - X^ W_q||^2 = ||X W - X^ W*||^2 + ||X^ (W* - W_q)||^2

The first term does not depend on the codes, so GPTQ on ``W*`` with X^'s ``H`` minimizes the layer's error as it
runs, its own activation quantization error included. ``mu`` (:func:`fitted_weight`) pulls ``W*`` towards ``W``;
with ``X^ = X`` it is ``W``. The steps stay the search's (chosen for ``W``). GPTAQ's own target is the float
model's output (``X`` from the float model, so upstream layers' errors are compensated too): tried on the real
ViT-S/14 with a second, unplanned simulation for the targets, it cost about 5 s more per conversion and did not
lower held-out output MSE at 6 or 8 bits, so the target here is the layer's own float output.

**Bias correction**: the mean output error of the quantized layer on the calibration rows, per output channel,
``E[f(X) - f_q(X)]``, added to its bias (``f_q`` with the activation quantizer, the noise and the final codes), so
the quantized layer is unbiased on the calibration distribution.

Both are checked on rows of held-out images where they are given: a layer keeps GPTQ's codes (or its correction)
only where its output MSE on those rows, with its activation quantizer and noise, is lower than without
(``gptq_rejected``, ``bias_correction_rejected`` in its metrics). GPTQ minimizes the weight's own error
``||X (W - dq(W_q))||`` on float inputs; at low activation bits that can raise the error of the layer as it runs
(on quantized inputs), which the check catches layer by layer. It does not make GPTQ pay off everywhere: on the
real ViT-S/14 at W6A6 EasyQuant + GPTQ still has a higher held-out output MSE than EasyQuant alone (the README's
methods table, ``benchmarks/results/methods.json``): activation error dominates there.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nq_onnx.config import WeightRounding
from nq_onnx.quantizers import ActQuantizer, WeightQuantizer
from nq_onnx.search import LinearOperand


SHIFT_DAMP = 1.0  # mu of W* as a multiple of the mean diagonal of X^T X^ (see fitted_weight)


def fitted_weight(w_kn: np.ndarray, x: np.ndarray, target: np.ndarray, damp: float = SHIFT_DAMP,
                  gram: np.ndarray | None = None) -> np.ndarray:
    """``W* = W + (x^T x + mu I)^-1 x^T (target - x) W`` (float64), ``mu`` = ``damp`` x the mean diagonal of
    ``x^T x``: the weight whose product with ``x`` is nearest ``target @ W``, pulled towards ``W`` by ``mu``.
    ``gram`` is ``x^T x`` where the caller has it.

    The pull is strong (``damp`` 1): a search fits on a few thousand rows, fewer than three per input channel of an
    MLP's second layer, and ``x - target`` (the activation quantization error) is largely noise that a weak pull
    fits. On the demo model's fourth block (2,056 rows) ``damp`` 0.1 raised W8A8 held-out output MSE above
    nearest rounding's on every layer tested; 1 kept it within 1 % of it there and lowered it at 6 and 4 bits."""
    x32, w32 = x.astype(np.float32), np.asarray(w_kn, dtype=np.float32)
    h = _gram(x32) if gram is None else gram.copy()
    h[np.diag_indices_from(h)] += damp * max(float(np.mean(np.diag(h))), np.finfo(np.float64).tiny)
    error = target.astype(np.float32) - x32
    if w32.shape[1] <= w32.shape[0]:  # the cheaper order of the same product (float32: it is a small correction)
        rhs = x32.T @ (error @ w32)
    else:
        rhs = (x32.T @ error) @ w32
    return w32.astype(np.float64) + np.linalg.solve(h, rhs.astype(np.float64))


def _gram(x: np.ndarray) -> np.ndarray:
    """``x^T x`` accumulated in float32 and returned in float64 (GPTQ-act's; GPTQ's own is float64 throughout)."""
    x32 = x.astype(np.float32)
    return (x32.T @ x32).astype(np.float64)


def gptq_codes(w_kn: np.ndarray, scales: np.ndarray, x: np.ndarray, bits: int, damp: float = 0.01,
               block: int = 128, target: np.ndarray | None = None) -> np.ndarray:
    """GPTQ codes (int8, ``[K, N]``) of ``w_kn`` with per-output-channel ``scales`` for input rows ``x``.

    With ``target`` rows (the shape of ``x``) the codes fit ``target @ w_kn`` from ``x`` (asymmetric calibration,
    module docstring): GPTQ rounds :func:`fitted_weight` instead of ``W``."""
    lo, hi = WeightQuantizer(bits).code_range
    if target is None:
        h, w = x.astype(np.float64).T @ x.astype(np.float64), np.array(w_kn, dtype=np.float64)
    else:
        h = _gram(x)
        w = fitted_weight(w_kn, x, target, gram=h)
    s = np.asarray(scales, dtype=np.float64)[None, :]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    codes = np.zeros(w.shape, dtype=np.int8)
    for start in range(0, w.shape[0], block):
        stop = min(start + block, w.shape[0])
        errors = np.zeros((stop - start, w.shape[1]))
        for k in range(start, stop):
            q = np.clip(np.rint(w[k] / s[0]), lo, hi)
            codes[k] = q
            error = (w[k] - q * s[0]) / u[k, k]
            w[k + 1:stop] -= np.outer(u[k, k + 1:stop], error)
            errors[k - start] = error
        w[stop:] -= u[start:stop, stop:].T @ errors
    return codes


def layer_error(x: np.ndarray, w_kn: np.ndarray, w_q: np.ndarray) -> float:
    """Mean squared ``X W - X dq(W)`` over rows and output channels (the weight's own share of the output error)."""
    diff = x.astype(np.float64) @ (w_kn.astype(np.float64) - w_q.astype(np.float64))
    return float(np.mean(diff**2))


def correction(x: np.ndarray, noise: np.ndarray | None, act: ActQuantizer, scale: float, w_kn: np.ndarray,
               bias: np.ndarray, w_q: np.ndarray) -> np.ndarray:
    """``E[f(X) - f_q(X)]`` per output channel over the rows ``x``: what bias correction adds to the bias."""
    rows = _Rows(x, noise, act, scale, w_kn, bias)
    return (rows.reference - rows.output(w_q)).astype(np.float64).mean(axis=0).astype(np.float32)


def output_mse(x: np.ndarray, noise: np.ndarray | None, act: ActQuantizer, scale: float, w_kn: np.ndarray,
               bias: np.ndarray, w_q: np.ndarray, delta: np.ndarray | None = None) -> float:
    """The quantized layer's output MSE against the float one on rows ``x`` (with a bias ``delta`` added)."""
    return _Rows(x, noise, act, scale, w_kn, bias).mse(w_q, delta)


class _Rows:
    """Rows on which a layer's candidates are compared: the float output and the quantized input, computed once."""

    def __init__(self, x: np.ndarray, noise: np.ndarray | None, act: ActQuantizer, scale: float, w_kn: np.ndarray,
                 bias: np.ndarray):
        self.noise = np.zeros(x.shape[1], np.float32) if noise is None else noise
        self.bias, self.reference = bias, x @ w_kn + bias
        self.quantized_input = act.fake_quant(x + self.noise, scale)

    def output(self, w_q: np.ndarray) -> np.ndarray:
        """``dq(q(X + N)) dq(W) + B - N dq(W)``: the quantized layer's output on these rows."""
        return self.quantized_input @ w_q + (self.bias - self.noise @ w_q)

    def mse(self, w_q: np.ndarray, delta: np.ndarray | None = None) -> float:
        """``mean((output(W_q) [+ delta] - (X W + B))^2)``."""
        quantized = self.output(w_q)
        if delta is not None:
            quantized = quantized + delta
        return float(np.mean((quantized.astype(np.float64) - self.reference) ** 2))


@dataclasses.dataclass(frozen=True)
class FinishedLayer:
    """A layer's final weight (codes where they are not nearest rounding of the steps, and ``dq``) and the bias
    correction it takes, with the errors that decided them."""

    codes: np.ndarray | None
    weight: np.ndarray
    correction: np.ndarray | None
    metrics: dict[str, float]


def finish_layer(operand: LinearOperand, scales: np.ndarray, rows: np.ndarray, held_out: np.ndarray | None,
                 act: ActQuantizer, scale: float, noise: np.ndarray | None, rounding: WeightRounding,
                 bias_correction: bool) -> FinishedLayer:
    """GPTQ codes and bias correction for one searched layer (module docstring); ``rows`` are the layer's fit input
    rows (all tokens of the fit images), ``held_out`` rows of other images decide what is kept."""
    metrics: dict[str, float] = {}
    codes, w_q = None, operand.quantized_weight(scales)
    check = held_out if held_out is not None else rows
    checked, mse = _Rows(check, noise, act, scale, operand.weight, operand.bias), None
    n = checked.noise
    if rounding in (WeightRounding.GPTQ, WeightRounding.GPTQ_ACT):
        if rounding == WeightRounding.GPTQ:
            candidate = gptq_codes(operand.weight, scales, rows + n, operand.quantizer.bits)
        else:  # the layer as it runs: dq(q(X + N)) - N in, X W wanted
            candidate = gptq_codes(operand.weight, scales, act.fake_quant(rows + n, scale) - n,
                                   operand.quantizer.bits, target=rows)
        w_gptq = WeightQuantizer.dequantize(candidate, scales)
        metrics["weight_error_nearest"] = layer_error(check + n, operand.weight, w_q)
        metrics["weight_error_gptq"] = layer_error(check + n, operand.weight, w_gptq)
        metrics["mse_nearest"] = mse = checked.mse(w_q)
        metrics["mse_gptq"] = checked.mse(w_gptq)
        if metrics["mse_gptq"] < metrics["mse_nearest"]:
            codes, w_q, mse = candidate, w_gptq, metrics["mse_gptq"]
        else:
            metrics["gptq_rejected"] = 1.0
    correction_ = None
    if bias_correction:
        candidate = correction(rows, noise, act, scale, operand.weight, operand.bias, w_q)
        before = checked.mse(w_q) if mse is None else mse
        after = checked.mse(w_q, candidate)
        metrics["mse_before_bias_correction"], metrics["mse_after_bias_correction"] = before, after
        if after < before:
            correction_ = candidate
        else:
            metrics["bias_correction_rejected"] = 1.0
    return FinishedLayer(codes, w_q, correction_, metrics)
