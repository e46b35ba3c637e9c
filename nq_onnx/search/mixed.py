"""Mixed precision under an average-bit budget (after PTQ-ViT, Liu et al., NeurIPS 2021).

A *module* here is one activation group: its input tensor and the layers that read it (their weights take the
group's bit-width too, so a module is ``WbAb``). Its sensitivity at ``b`` bits is by default the model output's
MSE with that module alone quantized (:func:`nq_onnx.calibration.simulate.output_sensitivities`: weights MinMax,
the input at the multiple of its MinMax step with the least squared error, as the searches clip; on
``QuantConfig.mixed_images`` fit images, 4 by default), its change from the uniform model at the budget's width
(``mixed_sensitivity = "joint"``), the same change with the quantizers the method's uniform search chose at each
width instead of MinMax ones (``"searched"``: a search per width first), or PTQ-ViT's (``"nuclear"``) ::

    Omega_i(b) = sum_l ||Y_l||_* * ||Y_l(b) - Y_l||_F^2

over the module's outputs ``Y_l`` (a linear layer's ``X W + B``; the product of an attention matmul, per head),
with ``||.||_*`` the nuclear norm (the sum of singular values: how much of the output's structure the module
carries) and ``Y_l(b)`` the output with the module's input and weights MinMax-quantized at ``b`` bits (the
searched quantizers come later and would need a search per bit-width). Its cost is its number of weights plus
activation values per image, so the model's average bit-width is ``sum_i c_i b_i / sum_i c_i``.

The assignment (:func:`assign_bits`) minimizes ``sum_i Omega_i(b_i)`` subject to ``sum_i c_i b_i <= budget *
sum_i c_i``: the point of the (average bits, total sensitivity) Pareto front at the budget, which PTQ-ViT
searches for. It is a multiple-choice knapsack, solved by dynamic programming over the cost (in units of 1/4096 of
the model's cost per bit). The result never exceeds the budget, and no single further step up
fits in it.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from nq_onnx.core.errors import ConfigError
from nq_onnx.core.plan import Module
from nq_onnx.core.plan import modules_average_bits as average_bits
from nq_onnx.core.quantizers import ActQuantizer, WeightQuantizer

BIT_CHOICES = (4, 5, 6, 8)
SENSITIVITY_DESC = "mixed precision: sensitivities"  # what the sensitivity pass's progress is called


def tracked(items: Sequence, progress: Callable | None, desc: str) -> Iterable:
    """``items`` through a progress callable (``progress(iterable, total=None, desc=None)``: a bar or log lines),
    or as they are without one."""
    return items if progress is None else progress(items, total=len(items), desc=desc)


def renamed(progress: Callable | None, name: str) -> Callable | None:
    """``progress`` with every loop it shows called ``name``."""
    if progress is None:
        return None
    return lambda iterable, total=None, desc=None: progress(iterable, total=total, desc=name)


def nuclear_norm(y: np.ndarray) -> float:
    """``||Y||_*`` of a matrix, or the sum over the leading axes of a stack of matrices."""
    y = np.asarray(y, dtype=np.float64)
    return float(np.sum(np.linalg.svd(y.reshape(-1, *y.shape[-2:]), compute_uv=False)))


def uniform_width(budget: float, choices: tuple[int, ...] = BIT_CHOICES) -> int:
    """The widest choice a uniform model can take within ``budget``."""
    return max(b for b in choices if b <= budget * (1 + 1e-12))


RESOLUTION = 4096  # cost units per average bit in the assignment's knapsack


def assign_bits(modules: list[Module], budget: float, choices: tuple[int, ...] = BIT_CHOICES) -> dict[str, int]:
    """Bits per module from ``choices`` minimizing the summed sensitivity with the cost-weighted average at most
    ``budget`` (module docstring): a multiple-choice knapsack solved by dynamic programming over the cost in units
    of ``sum c / RESOLUTION`` per bit (each module's ``c_i b_i`` rounded to the nearest unit; the capacity lowered
    until the solution fits the exact budget, so an assignment within ``2 len(modules)`` units of it may be
    missed), kept only if it beats uniform precision at the budget, then every step up that still fits taken."""
    choices = tuple(sorted(set(choices)))
    if budget < choices[0]:
        raise ConfigError(f"a bits budget of {budget:g} is below the narrowest choice ({choices[0]} bits)")
    modules = sorted(modules, key=lambda m: m.name)
    if not modules:
        return {}
    total = sum(m.cost for m in modules)
    limit = budget * total * (1 + 1e-12)
    unit = total / RESOLUTION
    weights = np.array([[round(m.cost * b / unit) for b in choices] for m in modules], dtype=np.int64)
    bits = None
    for capacity in range(int(limit / unit) + len(modules), -1, -1):
        bits = _knapsack(modules, weights, capacity, choices)
        if bits is not None and sum(m.cost * bits[m.name] for m in modules) <= limit:
            break
    uniform = dict.fromkeys(bits or (m.name for m in modules), uniform_width(budget, choices))
    if bits is None or _total(modules, uniform) < _total(modules, bits):
        bits = uniform
    return _fill(modules, bits, limit, choices)


FRONT_BUDGETS = tuple(np.round(np.arange(4.0, 8.001, 0.25), 2))  # the report's (average bits, sensitivity) front


def pareto_front(modules: list[Module], budgets: tuple[float, ...] = FRONT_BUDGETS,
                 choices: tuple[int, ...] = BIT_CHOICES) -> list[dict]:
    """PTQ-ViT's Pareto front of a plan's modules: for each budget, :func:`assign_bits`' assignment as its average
    bits, total sensitivity ``sum_i Omega_i(b_i)`` and groups per width (the trade-off the budget picks a point
    of)."""
    return [{"budget": float(budget)} | assignment_point(modules, assign_bits(modules, float(budget), choices),
                                                        choices) for budget in budgets]


def assignment_point(modules: list[Module], bits: dict[str, int], choices: tuple[int, ...] = BIT_CHOICES) -> dict:
    """An assignment of ``bits`` per module as a point of the front: its average bits, total sensitivity and groups
    per width."""
    return {"average_bits": average_bits(modules, bits), "sensitivity": _total(modules, bits),
            "groups": {str(b): sum(1 for v in bits.values() if v == b) for b in choices}}


def _total(modules: list[Module], bits: dict[str, int]) -> float:
    return sum(m.sensitivity[bits[m.name]] for m in modules)


def _knapsack(modules: list[Module], weights: np.ndarray, capacity: int,
              choices: tuple[int, ...]) -> dict[str, int] | None:
    """The least total sensitivity with summed ``weights`` at most ``capacity`` (``None``: nothing fits)."""
    best = np.full(capacity + 1, np.inf)
    best[0] = 0.0
    picks = np.zeros((len(modules), capacity + 1), dtype=np.int8)
    for i, m in enumerate(modules):
        new = np.full(capacity + 1, np.inf)
        for j, bits in enumerate(choices):
            w = int(weights[i, j])
            if w > capacity:
                continue
            trial = np.full(capacity + 1, np.inf)
            trial[w:] = best[: capacity + 1 - w] + m.sensitivity[bits]
            better = trial < new
            new[better], picks[i, better] = trial[better], j
        best = new
    at = int(np.argmin(best))
    if not np.isfinite(best[at]):
        return None
    out = {}
    for i in range(len(modules) - 1, -1, -1):
        j = int(picks[i, at])
        out[modules[i].name] = choices[j]
        at -= int(weights[i, j])
    return out


def _fill(modules: list[Module], bits: dict[str, int], limit: float, choices: tuple[int, ...]) -> dict[str, int]:
    """Take every step up that fits in ``limit`` (weighted bits), the largest sensitivity drop per bit first."""
    bits = dict(bits)
    used = sum(m.cost * bits[m.name] for m in modules)
    while True:
        steps = []
        for m in modules:
            i = choices.index(bits[m.name])
            if i + 1 < len(choices) and used + m.cost * (choices[i + 1] - bits[m.name]) <= limit:
                up = choices[i + 1]
                steps.append(((m.sensitivity[up] - m.sensitivity[bits[m.name]]) / (m.cost * (up - bits[m.name])),
                              m.name, m, up))
        if not steps:
            return bits
        _, _, m, up = min(steps, key=lambda s: (s[0], s[1]))
        used += m.cost * (up - bits[m.name])
        bits[m.name] = up


def _sq_error(y_q: np.ndarray, y: np.ndarray) -> float:
    diff = y_q.astype(np.float64) - y
    return float(np.sum(diff * diff))


def linear_sensitivity(x: np.ndarray, operands: tuple, absmax: float, signed: bool,
                       choices: tuple[int, ...] = BIT_CHOICES) -> dict[int, float]:
    """``Omega(b)`` of a group of linear layers (``LinearOperand``s) reading the token rows ``x``."""
    outputs = [x @ op.weight + op.bias for op in operands]
    norms = [nuclear_norm(y) for y in outputs]
    out = {}
    for bits in choices:
        act = ActQuantizer(bits, signed)
        x_q = act.fake_quant(x, act.minmax_scale(absmax))
        total = 0.0
        for op, y, norm in zip(operands, outputs, norms):
            w = WeightQuantizer(bits)
            total += norm * _sq_error(x_q @ w.fake_quant(op.weight, w.minmax_scales(op.weight)) + op.bias, y)
        out[bits] = total
    return out


def matmul_sensitivity(a: np.ndarray, b: np.ndarray, which: int, absmax: float, signed: bool,
                       choices: tuple[int, ...] = BIT_CHOICES) -> dict[int, float]:
    """``Omega(b)`` of operand ``which`` (0: ``A``, 1: ``B``) of the batched product ``A @ B``, the other in float."""
    y = a @ b
    norm = nuclear_norm(y)
    out = {}
    for bits in choices:
        act = ActQuantizer(bits, signed)
        ops = [a, b]
        ops[which] = act.fake_quant(ops[which], act.minmax_scale(absmax))
        out[bits] = norm * _sq_error(ops[0] @ ops[1], y)
    return out
