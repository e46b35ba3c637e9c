"""Second-order weight rounding (GPTQ) and bias correction: what a layer does after its steps are chosen.

**GPTQ** (Frantar et al. 2023, after OBQ): with the layer's input rows ``X`` (``[T, K]``, ``X + N`` where the layer
takes noise) and ``H = X^T X + lambda I`` (``lambda`` = ``damp`` x the mean diagonal), the codes of a ``[K, N]`` weight
are chosen input channel by input channel, ``k = 0 .. K-1``, each rounding error pushed onto the channels not yet
rounded so that ``X W`` moves as little as possible::

    q_k = clip(rint(W_k / s), lo, hi)               (per output channel steps s, fixed by the search)
    e_k = (W_k - s q_k) / U_kk
    W_j -= U_kj e_k            for j > k            (U: the upper Cholesky factor of H^-1)

in blocks of ``block`` channels with the update of the later blocks deferred (the same arithmetic, fewer passes).
Under a kernel pairs' limit (``int8-paired`` storage, :func:`nq_onnx.core.quant.limit_pairs`) an odd channel's codes
are clipped to ``+-(limit - |q_2i|)`` after its even partner's, so the pair never passes the limit and the clipping
error, like a rounding error, goes to the channels after it.
``H`` is summed in float32 and factored in float64 without forming ``H^-1`` (:func:`inverse_cholesky`): on the real
ViT-S/14 this and bias correction's column means (:func:`correction`) halved the rounding step's share of a
conversion (``search.rounding_s`` in ``benchmarks/results/methods_vnni.json``).
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
from typing import TYPE_CHECKING

import numpy as np

from nq_onnx.core.config import QuantConfig
from nq_onnx.core.quant import denoising_delta
from nq_onnx.core.quantizers import ActQuantizer, WeightQuantizer
from nq_onnx.core.technique import LayerFinish, Technique

if TYPE_CHECKING:
    from nq_onnx.search.groups import LinearOperand


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
    """``x^T x`` accumulated in float32 and returned in float64 (factored in float64: :func:`inverse_cholesky`)."""
    x32 = x.astype(np.float32)
    return (x32.T @ x32).astype(np.float64)


def gptq_codes(w_kn: np.ndarray, scales: np.ndarray, x: np.ndarray, bits: int, damp: float = 0.01,
               block: int = 128, target: np.ndarray | None = None, pair_limit: int | None = None) -> np.ndarray:
    """GPTQ codes (int8, ``[K, N]``) of ``w_kn`` with per-output-channel ``scales`` for input rows ``x``.

    With ``target`` rows (the shape of ``x``) the codes fit ``target @ w_kn`` from ``x`` (asymmetric calibration,
    module docstring): GPTQ rounds :func:`fitted_weight` instead of ``W``."""
    quantizer = WeightQuantizer(bits, pair_limit)
    lo, hi = quantizer.code_range
    h = _gram(x)
    w = np.array(w_kn, dtype=np.float64) if target is None else fitted_weight(w_kn, x, target, gram=h)
    s = np.asarray(scales, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    u = inverse_cholesky(h)
    codes = np.zeros(w.shape, dtype=np.int8)
    for start in range(0, w.shape[0], block):
        stop = min(start + block, w.shape[0])
        errors = np.zeros((stop - start, w.shape[1]))
        for k in range(start, stop):
            q = np.clip(np.rint(w[k] / s), lo, hi)
            if quantizer.paired and k % 2:
                room = pair_limit - np.abs(codes[k - 1].astype(np.int32))
                q = np.clip(q, -room, room)
            codes[k] = q
            error = errors[k - start]
            np.subtract(w[k], q * s, out=error)
            error /= u[k, k]
            w[k + 1:stop] -= u[k, k + 1:stop, None] * error
        w[stop:] -= u[start:stop, stop:].T @ errors
    return codes


def inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``, positive diagonal) without forming ``H^-1``.

    With ``P`` the order-reversing permutation and ``P H P = L L^T`` (lower Cholesky)::

        H^-1 = P L^-T L^-1 P = (P L^-T P) (P L^-1 P) = U^T U,    U = P L^-1 P

    ``L^-1`` is lower triangular with a positive diagonal, so ``U`` is upper with one: the unique factor. One
    Cholesky and one triangular inverse (:func:`lower_inverse`, about ``2/3 K^3`` flops in all) instead of a general
    inverse and a Cholesky of it (about ``7/3 K^3``): 0.08 s against 0.19 s for a ``1536 x 1536`` ``H`` on two
    cores, the same ``U`` to 5e-16 of its largest entry."""
    return np.ascontiguousarray(lower_inverse(np.linalg.cholesky(h[::-1, ::-1]))[::-1, ::-1])


def lower_inverse(lower: np.ndarray, leaf: int = 128) -> np.ndarray:
    """``L^-1`` of a lower-triangular ``L`` by halves::

        [A 0]^-1   [ A^-1            0   ]
        [C D]    = [-D^-1 C A^-1    D^-1 ]

    so all but ``leaf``-sized diagonal blocks is matrix products (numpy has no triangular inverse; SciPy's LAPACK
    ``trtri`` runs on a second OpenBLAS whose threads contend with numpy's on a small machine, which measured
    slower here)."""
    n = len(lower)
    if n <= leaf:
        return np.tril(np.linalg.inv(lower))
    m = n // 2
    a, d = lower_inverse(lower[:m, :m], leaf), lower_inverse(lower[m:, m:], leaf)
    out = np.zeros_like(lower)
    out[:m, :m], out[m:, m:] = a, d
    out[m:, :m] = -(d @ (lower[m:, :m] @ a))
    return out


def layer_error(x: np.ndarray, w_kn: np.ndarray, w_q: np.ndarray) -> float:
    """Mean squared ``X W - X dq(W)`` over rows and output channels (the weight's own share of the output error):
    the product in float32, its squares summed in float64."""
    diff = np.asarray(x, np.float32) @ (np.asarray(w_kn, np.float32) - np.asarray(w_q, np.float32))
    return _mean_square(diff)


def _mean_square(diff: np.ndarray) -> float:
    """``mean(diff^2)`` with the squares summed in float64."""
    flat = diff.reshape(-1).astype(np.float64)
    return float(flat @ flat) / max(flat.size, 1)


def correction(x: np.ndarray, noise: np.ndarray | None, act: ActQuantizer, scale: float, w_kn: np.ndarray,
               bias: np.ndarray, w_q: np.ndarray) -> np.ndarray:
    """``E[f(X) - f_q(X)]`` per output channel over the rows ``x``: what bias correction adds to the bias. Both
    outputs are linear in their inputs, so the mean error is a product of column means (float64; the biases
    cancel), no product of the rows::

        E[X W + B - (dq(q(X + N)) dq(W) + B - N dq(W))] = E[X] W - (E[dq(q(X + N))] - N) dq(W)"""
    n = np.zeros(x.shape[1], np.float32) if noise is None else noise
    mean_x = x.astype(np.float64).mean(axis=0)
    mean_q = act.fake_quant(x + n, scale).astype(np.float64).mean(axis=0) - n
    return (mean_x @ np.asarray(w_kn, np.float64) - mean_q @ np.asarray(w_q, np.float64)).astype(np.float32)


def output_mse(x: np.ndarray, noise: np.ndarray | None, act: ActQuantizer, scale: float, w_kn: np.ndarray,
               bias: np.ndarray, w_q: np.ndarray, delta: np.ndarray | None = None) -> float:
    """The quantized layer's output MSE against the float one on rows ``x`` (with a bias ``delta`` added)."""
    rows = LayerRows(x, noise, act, scale, w_kn, bias)
    return rows.mse(rows.output(w_q), delta)


class LayerRows:
    """Rows on which a layer's candidates are compared: the float output and the quantized input, computed once;
    each candidate's output is computed once by :meth:`output` and scored by :meth:`mse`."""

    def __init__(self, x: np.ndarray, noise: np.ndarray | None, act: ActQuantizer, scale: float, w_kn: np.ndarray,
                 bias: np.ndarray):
        self.noise = np.zeros(x.shape[1], np.float32) if noise is None else noise
        self.bias, self.reference = bias, x @ w_kn + bias
        self.noisy_input = x + self.noise  # X + N, what the layer's quantizer and GPTQ's weight error see
        self.quantized_input = act.fake_quant(self.noisy_input, scale)

    def output(self, w_q: np.ndarray) -> np.ndarray:
        """``dq(q(X + N)) dq(W) + B - N dq(W)``: the quantized layer's output on these rows."""
        return self.quantized_input @ w_q + (self.bias + denoising_delta(self.noise, w_q))

    def mse(self, output: np.ndarray, delta: np.ndarray | None = None) -> float:
        """``mean((output [+ delta] - (X W + B))^2)``."""
        diff = output - self.reference
        if delta is not None:
            diff += delta
        return _mean_square(diff)


@dataclasses.dataclass(frozen=True)
class FinishedLayer:
    """A layer's final weight (codes where they are not nearest rounding of the steps, and ``dq``) and the bias
    correction it takes, with the errors that decided them."""

    codes: np.ndarray | None
    weight: np.ndarray
    correction: np.ndarray | None
    metrics: dict[str, float]


def finish_layer(operand: LinearOperand, scales: np.ndarray, rows: np.ndarray, held_out: np.ndarray | None,
                 act: ActQuantizer, scale: float, noise: np.ndarray | None, config: QuantConfig,
                 finishers: list[Technique]) -> FinishedLayer:
    """One searched layer finished by ``finishers`` in turn (their :meth:`~nq_onnx.core.technique.Technique.
    finish_layer`: GPTQ's codes, then bias correction; module docstring); ``rows`` are the layer's fit input rows (all
    tokens of the fit images), ``held_out`` rows of other images decide what is kept."""
    w_q = operand.quantized_weight(scales)
    if not finishers:
        return FinishedLayer(None, w_q, None, {})
    check = held_out if held_out is not None else rows
    layer = LayerFinish(operand, scales, rows, LayerRows(check, noise, act, scale, operand.weight, operand.bias), act,
                        scale, noise, w_q)
    for technique in finishers:
        technique.finish_layer(config, layer)
    return FinishedLayer(layer.codes, layer.weight, layer.correction, layer.metrics)
