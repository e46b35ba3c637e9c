"""What the searches score: a layer's output error from its input error, and the similarity objectives.

With the weights fixed, a quantized layer's output error is linear in its input's quantization error
(:class:`LayerError`), so a candidate's MSE, cosine similarity (EasyQuant) or Pearson correlation (PTQ-ViT) follows
from a few dot products instead of a full output; :func:`ranking_loss` is PTQ-ViT's penalty on attention scores
that change order. Every term is a small difference computed as such, so similarities keep their precision near 1.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from nq_onnx.core.config import Objective

if TYPE_CHECKING:
    from nq_onnx.search.groups import LinearOperand


def colsum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sum_rows a * b`` per column, in float64."""
    return np.einsum("tn,tn->n", a, b).astype(np.float64)


def cosine_of(t2, et, e2):
    """The cosine of ``t + E`` with ``t`` from ``||t||^2``, ``<E, t>`` and ``||E||^2`` (0 where ``t = 0``)."""
    t2, et, e2 = (np.asarray(v, dtype=np.float64) for v in (t2, et, e2))
    den = np.sqrt(t2 * np.maximum(t2 + 2.0 * et + e2, 0.0))
    return np.where(den > 0, (t2 + et) / np.maximum(den, 1e-300), 1.0)


def similarity_of(objective: Objective, t2, et, e2, t_sum, e_sum, n: int):
    """The similarity of ``t + E`` with ``t`` from the cosine's terms and, for Pearson, the sums of ``t`` and ``E``
    over ``n`` values: Pearson's correlation is the cosine of the centred vectors, whose terms are
    ``||t||^2 - (sum t)^2 / n``, ``<E, t> - sum E sum t / n`` and ``||E||^2 - (sum E)^2 / n``."""
    if objective == Objective.PEARSON:
        t_sum, e_sum = np.asarray(t_sum, dtype=np.float64), np.asarray(e_sum, dtype=np.float64)
        t2, et, e2 = t2 - t_sum * t_sum / n, et - t_sum * e_sum / n, e2 - e_sum * e_sum / n
    return cosine_of(t2, et, e2)


def ranking_pairs(scores: np.ndarray, pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """``pairs`` random column pairs ``(i, j)`` per row of ``scores`` (``[..., n]``: one row per query), kept where
    the float scores differ; returns ``(row, i, j, sign(A_i - A_j))``."""
    flat = scores.reshape(-1, scores.shape[-1])
    row = np.repeat(np.arange(flat.shape[0]), pairs)
    i, j = rng.integers(0, flat.shape[1], (2, row.size))
    sign = np.sign(flat[row, i] - flat[row, j])
    keep = sign != 0
    return row[keep], i[keep], j[keep], sign[keep]


def ranking_loss(scores_q: np.ndarray, pairs: tuple[np.ndarray, ...], margin: float) -> float:
    """PTQ-ViT's ranking loss on attention scores, averaged over the sampled pairs::

        mean over (i, j) of relu(theta - (A^_i - A^_j) sign(A_i - A_j))

    (``A`` float, ``A^`` quantized): zero when every sampled pair keeps its order by at least ``theta``."""
    row, i, j, sign = pairs
    if row.size == 0:
        return 0.0
    flat = scores_q.reshape(-1, scores_q.shape[-1])
    gap = (flat[row, i].astype(np.float64) - flat[row, j]) * sign
    return float(np.mean(np.maximum(margin - gap, 0.0)))


@dataclasses.dataclass(frozen=True)
class LayerError:
    """One layer's output error as a function of its input's quantization error, its weights fixed.

    With ``t = X W + B`` the float output, ``W_q`` the quantized weight and ``X + N`` quantized to ``X_q`` (the
    bias ``B - N W_q``), the output errs by ``E = D W_q + C`` with ``D = X_q - (X + N)`` and ``C = X (W_q - W)``;
    so ::

        ||E||^2 = ||D W_q||^2 + 2 <D, C W_q^T> + ||C||^2,        <E, t> = <D, t W_q^T> + <C, t>

    and ``||D W_q|| = ||D R||`` with ``R = W_q`` where ``N <= K`` and else the ``K x K`` factor of
    ``W_q^T = Q R^T`` (``Q`` orthonormal): a candidate costs a ``T x K x min(K, N)`` product and two dot
    products instead of ``T x K x N`` and a pass over the output. Every term is small and computed as such.

    Every term is a sum over the ``T`` token rows, so the per-row parts are kept: :meth:`rows` gives the same
    error on a subset of the rows (the searches screen candidates on a subset,
    :func:`nq_onnx.search.grids.grid_argmax`).
    """

    factor: np.ndarray
    c_wt: np.ndarray
    t_wt: np.ndarray
    c2_rows: np.ndarray  # per row: ||C_i||^2, <C_i, t_i>, ||t_i||^2, sum C_i, sum t_i (float64)
    ct_rows: np.ndarray
    t2_rows: np.ndarray
    c_sum_rows: np.ndarray
    t_sum_rows: np.ndarray
    width: int  # N, the output values per row
    w_sum: np.ndarray  # W_q 1: sum(D W_q) = sum_k (sum_rows D)_k (W_q 1)_k, for Pearson
    weight: np.ndarray | None = None  # per row (:meth:`rows`); None: every row counts once

    @classmethod
    def build(cls, x: np.ndarray, layer: "LinearOperand", w_q: np.ndarray, target: np.ndarray) -> "LayerError":
        """``target``: the float output ``x W + B``."""
        c = x @ (w_q - layer.weight)
        factor = w_q
        if w_q.shape[1] > w_q.shape[0]:
            factor = np.linalg.qr(w_q.T.astype(np.float64), mode="r").T.astype(np.float32)
        c2, ct, t2, c_sum, t_sum = row_terms(c, target)
        return cls(np.ascontiguousarray(factor), c @ w_q.T, target @ w_q.T, c2, ct, t2, c_sum, t_sum,
                   target.shape[1], w_q.sum(axis=1, dtype=np.float64))

    def rows(self, index: np.ndarray, weight: np.ndarray | None = None) -> "LayerError":
        """The same layer's error on the token rows ``index`` alone (``d`` then holds those rows), each row's terms
        counted ``weight`` times (an estimate of the whole from a stratified sample of its rows)."""
        per_row = {f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)
                   if f.name not in ("factor", "width", "w_sum", "weight")}
        if weight is not None:
            weight = np.asarray(weight, dtype=np.float64)
            per_row = {k: v * (weight if v.ndim == 1 else weight[:, None].astype(v.dtype)) for k, v in per_row.items()}
        return dataclasses.replace(self, weight=weight, **per_row)

    @property
    def size(self) -> float:
        rows = self.c2_rows.size if self.weight is None else float(self.weight.sum())
        return rows * self.width

    @property
    def t2(self) -> float:
        return float(self.t2_rows.sum())

    def terms(self, d: np.ndarray) -> tuple[float, float]:
        """``(||E||^2, <E, t>)`` for the input error ``d`` (its rows weighted as :meth:`rows` says)."""
        dr = (d if self.weight is None else d * np.sqrt(self.weight)[:, None].astype(d.dtype)) @ self.factor
        return (dot(dr, dr) + 2.0 * dot(d, self.c_wt) + float(self.c2_rows.sum()),
                dot(d, self.t_wt) + float(self.ct_rows.sum()))

    def mse(self, d: np.ndarray) -> float:
        return self.terms(d)[0] / self.size

    def cosine(self, d: np.ndarray) -> float:
        e2, et = self.terms(d)
        return float(cosine_of(self.t2, et, e2))

    def similarity(self, d: np.ndarray, objective: Objective) -> float:
        """:meth:`cosine`, or Pearson's correlation of the whole output with ``sum E = sum(D W_q) + sum C``."""
        if objective == Objective.COSINE:
            return self.cosine(d)
        e2, et = self.terms(d)
        d_sum = d.sum(axis=0, dtype=np.float64) if self.weight is None else self.weight @ d.astype(np.float64)
        e_sum = float(d_sum @ self.w_sum) + float(self.c_sum_rows.sum())
        return float(similarity_of(objective, self.t2, et, e2, float(self.t_sum_rows.sum()), e_sum, self.size))


ROW_BLOCK = 128  # rows of row_terms' float64 copies at a time (they stay in cache)


def row_terms(c: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per row, in float64: ``||c_i||^2``, ``<c_i, t_i>``, ``||t_i||^2``, ``sum c_i``, ``sum t_i`` (``[5, rows]``).
    Each row's values do not depend on the others, so they are computed :data:`ROW_BLOCK` rows at a time: the same
    values as ``einsum`` of whole float64 copies, each copy made once and read while in cache (a 1,024 x 1,152
    output: 9.7 -> 2.1 ms)."""
    out = np.empty((5, c.shape[0]))
    for i in range(0, c.shape[0], ROW_BLOCK):
        rows = slice(i, i + ROW_BLOCK)
        c64, t64 = c[rows].astype(np.float64), t[rows].astype(np.float64)
        out[0, rows] = np.einsum("tn,tn->t", c64, c64)
        out[1, rows] = np.einsum("tn,tn->t", c64, t64)
        out[2, rows] = np.einsum("tn,tn->t", t64, t64)
        out[3, rows] = c[rows].sum(axis=1, dtype=np.float64)
        out[4, rows] = t[rows].sum(axis=1, dtype=np.float64)
    return out


def dot(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()))
