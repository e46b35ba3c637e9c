"""The searches' grids and how they are scored: every point, coarse to fine, screened on a subset of the rows, or
summed part by part with candidates dropped once they cannot win.

A search scores each candidate of a grid (multipliers of a MinMax step) and keeps the best. Two ways score less for
the same choice or nearly: :func:`grid_argmax` with a ``screen`` scores every point on a stratified sample of the
rows (:func:`screen_rows`) and only the best few on all of them; :func:`additive_argmin` minimizes a loss that is a
sum of non-negative parts (row sets), dropping a candidate as soon as its partial sum passes the best complete one,
which gives exactly the full search's result.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

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
