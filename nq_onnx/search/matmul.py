"""EasyQuant for the attention matmuls ``A @ B`` (``Q K^T``, ``A V``), both operands quantized per tensor (or ``A``
twin-uniform): the two steps alternate over each quantizer's candidates, scored on the product's similarity with
the float product (:func:`search_act_matmul`), without forming the product where the algebra is cheaper
(:class:`OperandError`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nq_onnx.core.config import Objective, SearchConfig
from nq_onnx.search.grids import grid, grid_argmax
from nq_onnx.search.objectives import cosine_of, dot, ranking_loss, ranking_pairs, similarity_of


def search_act_matmul(a: np.ndarray, b: np.ndarray, absmax: tuple[float, float], quantizers: tuple,
                      config: SearchConfig, ranking: bool = False) -> tuple[float, float, dict]:
    """EasyQuant for ``A @ B`` with both operands quantized (per tensor, or ``A`` twin-uniform): alternate the two
    steps over each quantizer's candidates, on the cosine similarity of the product (PTQ4ViT scores with a
    Hessian-guided metric, which needs output gradients an ONNX model does not give: the product's cosine here).
    ``config.objective`` Pearson scores the product's correlation instead; with ``ranking`` (attention scores
    ``Q K^T``) and ``config.ranking_loss = gamma > 0`` a candidate scores ``similarity - gamma * ranking loss``
    (PTQ-ViT, :func:`ranking_loss` on ``config.ranking_pairs`` sampled pairs per query row)."""
    base = [q.minmax_scale(m) for q, m in zip(quantizers, absmax)]
    full = ProductScore(a, b, quantizers, base, config, ranking)
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


class ProductScore:
    """The similarity of ``q(A) @ q(B)`` with ``A @ B`` as one operand's step varies, the other's quantized at its
    current step (:meth:`set`).

    With ``B`` fixed at ``B_q`` and ``A`` quantized with error ``D``, the product errs by ``E = D B_q + C``
    (``C = A (B_q - B)``), which :class:`OperandError` scores without forming ``E``; a varying ``B`` is the same
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
        self._errors: dict[int, OperandError] = {}

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
                self._errors[which] = OperandError.build(self.operands, self.quantized, self.target, which)
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
class OperandError:
    """The error of a batched product ``L R`` (``[S, T, k] @ [S, k, m]``) whose right operand is fixed at ``R_q``
    and whose left one errs by ``D``: ``E = D R_q + C`` with ``C = L (R_q - R)``, so ::

        ||E||^2 = ||D R_q||^2 + 2 <D, C R_q^T> + ||C||^2,    <E, t> = <D, t R_q^T> + <C, t>,
        sum E = sum_(s,i,j) D_sij (R_q 1)_sj + sum C

    and ``||D R_q||^2 = <D G, D>`` with the ``k x k`` Gram matrices ``G = R_q R_q^T`` where ``k < m``: a candidate
    costs ``S T k min(k, m)`` instead of the product's ``S T k m`` (``Q K^T``: ``k`` = 64 head channels, ``m`` =
    the tokens). The same algebra as :class:`nq_onnx.search.objectives.LayerError`, per slice."""

    right: np.ndarray  # R_q, or G where k < m
    gram: bool
    c_rt: np.ndarray
    t_rt: np.ndarray
    c2: float
    ct: float
    r_sum: np.ndarray
    c_sum: float

    @classmethod
    def build(cls, operands: tuple, quantized: list, target: np.ndarray, which: int) -> "OperandError":
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
