"""Mixed precision (``bits_budget``): every group and the weights of the layers reading it take 4, 5, 6 or 8 bits,
chosen before the search so that the cost-weighted average width stays within the budget.

Each group's cost is its input's values per image plus the weights of the linear layers reading it
(:func:`group_costs`); its sensitivity at each width is measured as ``mixed_sensitivity`` says (the model output's
error with the group alone quantized, its change around the budget's uniform width, PTQ-ViT's nuclear-norm-weighted
error, or the method's own uniform search at each width: :class:`~nq_onnx.core.config.MixedSensitivity`); the
widths are the knapsack's choice (:func:`nq_onnx.search.mixed.assign_bits`, where the maths is). The plan records each
group's cost and sensitivities (:attr:`nq_onnx.core.plan.GroupPlan.precision`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import numpy as np

from nq_onnx.calibration.collect import float_values
from nq_onnx.calibration.simulate import output_sensitivities, searched_sensitivities
from nq_onnx.core.config import MixedSensitivity
from nq_onnx.core.plan import Module, Plan
from nq_onnx.core.quantizers import ActQuantizer
from nq_onnx.core.technique import Technique, register
from nq_onnx.core.timing import timed
from nq_onnx.search.grids import grid
from nq_onnx.search.mixed import (BIT_CHOICES, SENSITIVITY_DESC, assign_bits, linear_sensitivity, matmul_sensitivity,
                                  renamed, tracked, uniform_width)
from nq_onnx.passes.find_layers import ACT_MATMUL, GroupSpec, Layers
from nq_onnx.search.groups import group_rng, linear_operand, sample_rows

if TYPE_CHECKING:
    from nq_onnx.search.planner import SearchPlanner

SENSITIVITY_IMAGES = 4  # images whose float values give the mixed-precision sensitivities
SENSITIVITY_ROWS = 256  # token rows per linear group's sensitivity (an SVD each)
SENSITIVITY_SLICES = 8  # per-head product maps per attention matmul's sensitivity
CLIP_VALUES = 1 << 18  # float values per group choosing the mixed-precision sensitivities' clipped steps



def group_costs(layers: Layers, weights: dict[str, np.ndarray], values: dict[str, np.ndarray],
                images: int) -> dict[str, int]:
    """Each group's cost in the bit budget (:mod:`nq_onnx.search.mixed`): its input's values per image (``values`` holds
    the float group inputs of ``images`` images) plus the weights of the linear layers reading it."""
    return {g.name: int(values[g.tensor].size // images + sum(weights[c].size for c in g.consumers
                                                              if layers.layer(c).kind != ACT_MATMUL))
            for g in layers.groups}


def assign(planner: SearchPlanner, inputs: dict[str, np.ndarray],
           progress: Callable | None = None) -> tuple[dict[str, int], dict[str, Module]]:
    """Each group's bits under ``config.bits_budget`` (:mod:`nq_onnx.search.mixed`): costs from the float values of the
    first fit images, sensitivities as ``config.mixed_sensitivity`` says (``progress`` shows each group's)."""
    images = min(planner.fit_images, SENSITIVITY_IMAGES)
    feeds = {k: v[:images] for k, v in inputs.items()}
    values = float_values(planner.model, sorted({g.tensor for g in planner.layers.groups}), feeds)
    if planner.config.mixed_sensitivity == MixedSensitivity.SEARCHED:
        sensitivity = searched(planner, inputs, progress)
    elif planner.config.mixed_sensitivity in (MixedSensitivity.OUTPUT, MixedSensitivity.JOINT):
        steps = {g.name: clipped_steps(planner, g, values[g.tensor]) for g in planner.layers.groups}
        one = {k: v[: min(planner.config.mixed_images, planner.fit_images)] for k, v in inputs.items()}
        base = None
        if planner.config.mixed_sensitivity == MixedSensitivity.JOINT:
            base = uniform_width(planner.config.bits_budget, BIT_CHOICES)
        sensitivity = output_sensitivities(planner.model, planner.layers, planner.weights, one, planner.unsigned, steps,
                                           BIT_CHOICES, base, progress=renamed(progress, SENSITIVITY_DESC))
    else:
        groups = tracked(planner.layers.groups, progress, SENSITIVITY_DESC)
        sensitivity = {g.name: nuclear_sensitivity(planner, g, values) for g in groups}
    costs = group_costs(planner.layers, planner.weights, values, images)
    modules = {g.name: Module(g.name, costs[g.name], sensitivity[g.name]) for g in planner.layers.groups}
    return assign_bits(list(modules.values()), planner.config.bits_budget), modules

def searched(planner: SearchPlanner, inputs: dict[str, np.ndarray],
             progress: Callable | None = None) -> dict[str, dict[int, float]]:
    """``MixedSensitivity.SEARCHED``: each group's change of the output error when it takes its width-``b``
    uniform search's quantizers with every other group at the budget's uniform width
    (:func:`searched_sensitivities`)."""
    searched = uniform_searches(planner, BIT_CHOICES, progress)
    images = {k: v[: min(planner.config.mixed_images, planner.fit_images)] for k, v in inputs.items()}
    return searched_sensitivities(planner.model, planner.layers, planner.weights, images, planner.unsigned, searched,
                                  uniform_width(planner.config.bits_budget, BIT_CHOICES),
                                  progress=renamed(progress, SENSITIVITY_DESC))

def uniform_searches(planner: SearchPlanner, widths: tuple[int, ...],
                     progress: Callable | None = None) -> dict[int, dict[str, np.ndarray]]:
    """The method's uniform search at each of ``widths`` (no bits budget), each on its own simulator: per width,
    the finished simulator's feeds (:attr:`Simulator.feeds`: every group's step and noise, every layer's
    fake-quantized weight and delta)."""
    out = {}
    for bits in widths:
        config = dataclasses.replace(planner.config, bits_budget=None, w_bits=bits, a_bits=bits)
        uniform = type(planner)(planner.model, planner.layers, planner.stats, planner.search_data, config)
        uniform.run(Plan(model_digest="", config=config),
                    renamed(progress, f"{SENSITIVITY_DESC}: search at {bits} bits"))
        out[bits] = uniform.simulator.feeds
    return out

def clipped_steps(planner: SearchPlanner, group: GroupSpec, value: np.ndarray) -> dict[int, float]:
    """Per bit choice, the group's activation step from the search's grid of MinMax multiples with the least
    squared quantization error of its float values: the searches clip (a softmax output at 6 bits takes a
    step far below MinMax's ``1/63``), so MinMax steps would overstate a narrow width's harm."""
    flat = value.reshape(-1)
    rows = flat[:: max(1, flat.size // CLIP_VALUES)]  # evenly spaced: an unbiased estimate of the mean error
    alphas, out = grid(planner.config.search.act_alphas), {}
    for bits in BIT_CHOICES:
        act = ActQuantizer(bits, group.name not in planner.unsigned)
        steps = act.candidates(act.minmax_scale(planner.stats[group.tensor].absmax), alphas)
        errors = [float(np.mean((act.fake_quant(rows, step) - rows) ** 2)) for step in steps]
        out[bits] = float(steps[int(np.argmin(errors))])
    return out

def nuclear_sensitivity(planner: SearchPlanner, group: GroupSpec,
                        values: dict[str, np.ndarray]) -> dict[int, float]:
    """PTQ-ViT's sensitivity of a group (:mod:`nq_onnx.search.mixed`) on its float values."""
    absmax, signed = planner.stats[group.tensor].absmax, group.name not in planner.unsigned
    value = values[group.tensor]
    specs = [planner.layers.layer(name) for name in group.consumers]
    linear = [s for s in specs if s.kind != ACT_MATMUL]
    sensitivity = dict.fromkeys(BIT_CHOICES, 0.0)
    if linear:
        rows = sample_rows(value, group.channels, SENSITIVITY_ROWS, group_rng(2, group.name))
        operands = tuple(linear_operand(s, planner.weights[s.name], planner.tensors, 8) for s in linear)
        for bits, omega in linear_sensitivity(rows, operands, absmax, signed).items():
            sensitivity[bits] += omega
    for spec in specs:
        if spec.kind == ACT_MATMUL:
            a, b = values[spec.inputs[0]], values[spec.inputs[1]]
            if a.shape[:-2] == b.shape[:-2] and a.ndim >= 3:  # the first SENSITIVITY_SLICES maps (an SVD each)
                a, b = (v.reshape(-1, *v.shape[-2:])[:SENSITIVITY_SLICES] for v in (a, b))
                which = spec.inputs.index(group.tensor)
                for bits, omega in matmul_sensitivity(a, b, which, absmax, signed).items():
                    sensitivity[bits] += omega
    return sensitivity


@register
class MixedPrecision(Technique):
    name = "mixed_precision"

    def enabled(self, config) -> bool:
        return config.bits_budget is not None

    def assign_bits(self, planner, inputs, progress):
        with timed(planner.timings, "mixed_precision_s"):
            return assign(planner, inputs, progress)
