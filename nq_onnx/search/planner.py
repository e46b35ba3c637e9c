"""Turn calibration statistics into a plan: MinMax directly, EasyQuant/NoisyQuant by sequential search.

Layers are planned in *steps*: a step holds every unplanned layer whose inputs depend only on layers that
are already planned, so each search sees activations that passed through the quantized earlier layers
(the paper's pipeline), while layers reading the same tensor (q, k and v of one block) share a step.
With ``search.sequential = False`` every search sees the float model's activations instead.

The simulation runs on the first ``search_images + holdout_images`` calibration images. Every search fits on
the first ``search_images`` (:func:`split_images`); the rows of the others only decide whether a searched noise
is kept (:mod:`nq_onnx.search.groups`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from nq_onnx.calibration.collect import TensorStats
from nq_onnx.calibration.data import Dataset
from nq_onnx.calibration.simulate import Simulator
from nq_onnx.core.config import QuantConfig, SearchConfig, Target
from nq_onnx.passes.base import import_graph
from nq_onnx.passes.find_layers import ACT_MATMUL, GroupSpec, Layers, LayerSpec
from nq_onnx.core.plan import GroupPlan, LayerPlan, Module, Plan, TwinSpec
from nq_onnx.core.quantized_layer import bias_delta
from nq_onnx.core.quantizers import ActQuantizer, WeightQuantizer
from nq_onnx.search.rounding import finish_layer
from nq_onnx.search.matmul import search_act_matmul
from nq_onnx.core.timing import timed
from nq_onnx.core import technique as techniques
from nq_onnx.core.technique import GroupQuantizer, Technique
from nq_onnx.search.groups import (
    linear_operand,
    GroupSample,
    GroupSearch,
    group_rng,
    group_seed,
    search_linear_group,
    search_sample,
    search_with_fallback,
)

ACT_MATMUL_SLICES = 16


def float_weights(graph: gs.Graph, layers: Layers) -> dict[str, np.ndarray]:
    """Each linear layer's float weight as the graph stores it (not copied when it already is float32: a weight
    in an external data file stays a memory map)."""
    nodes = {n.name: n for n in graph.nodes}
    return {
        spec.name: np.asarray(nodes[spec.node].inputs[1].values, dtype=np.float32)
        for spec in layers.layers
        if spec.kind != ACT_MATMUL
    }


def layer_steps(graph: gs.Graph, layers: Layers) -> list[list[str]]:
    """Layer names in dependency steps (see module docstring)."""
    index = {spec.node: i for i, spec in enumerate(layers.layers)}
    masks: dict[str, int] = {}
    deps: dict[int, int] = {}
    for node in graph.nodes:
        mask = 0
        for tensor in node.inputs:
            mask |= masks.get(tensor.name, 0)
        if node.name in index:
            deps[index[node.name]] = mask
            mask |= 1 << index[node.name]
        for tensor in node.outputs:
            masks[tensor.name] = mask
    steps, planned = [], 0
    remaining = list(range(len(layers.layers)))
    while remaining:
        ready = [i for i in remaining if deps.get(i, 0) & ~planned == 0]
        steps.append([layers.layers[i].name for i in ready])
        for i in ready:
            planned |= 1 << i
        remaining = [i for i in remaining if i not in ready]
    return steps


def split_images(value: np.ndarray, images: int, fit: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``value`` (batch-major over ``images`` inputs) cut into the rows of the first ``fit`` inputs and the rest;
    ``None`` for the rest where there is none, or the leading axis does not run over the inputs."""
    if fit >= images or value.ndim == 0 or value.shape[0] % images:
        return value, None
    cut = value.shape[0] // images * fit
    return value[:cut], value[cut:]


def search_counts(available: int, search: "SearchConfig") -> tuple[int, int]:
    """``(fit, held out)`` images: ``search_images`` to fit on, then up to ``holdout_images`` more, at most a third
    of what there is (a handful of images all go to the fit)."""
    held = min(search.holdout_images, available // 3)
    return min(search.search_images, available - held), held


def _range(stats: TensorStats) -> tuple[float, float]:
    return float(stats.channel_min.min()), float(stats.channel_max.max())


def plain_group(group: GroupSpec, scale: float, quantizer: ActQuantizer, stats: TensorStats,
                twin: TwinSpec | None = None) -> GroupPlan:
    """A group quantized without noise (MinMax, or an activation-matmul operand)."""
    return GroupPlan(group.name, group.tensor, scale, quantizer.bits, signed=quantizer.signed,
                     input_range=_range(stats), base_scale=scale, twin=twin, low=quantizer.low)


def unsigned_groups(layers: Layers, stats: dict[str, TensorStats], config: QuantConfig) -> frozenset[str]:
    """Groups whose calibrated input never goes below zero and takes no noise: quantized with unsigned codes (none for
    the ``gpu`` target, whose activations are symmetric int8)."""
    if config.target == Target.GPU:
        return frozenset()
    return frozenset(
        g.name
        for g in layers.groups
        if float(stats[g.tensor].channel_min.min()) >= 0 and not (config.method.noisy and g.noisy)
    )


def group_quantizers(layers: Layers, stats: dict[str, TensorStats], config: QuantConfig, bits: dict[str, int],
                     unsigned: frozenset[str]) -> dict[str, GroupQuantizer]:
    """The activation quantizer each enabled technique chooses for a group in place of the uniform one (twin-uniform,
    asymmetric), asked in registration order: a later technique sees what the earlier ones chose. ``bits``: a
    group's width where it is not ``config.a_bits`` (mixed precision)."""
    chosen: dict[str, GroupQuantizer] = {}
    for technique in techniques.enabled(config):
        chosen.update(technique.group_quantizers(config, layers, stats, bits, unsigned, dict(chosen)))
    return chosen


def group_quantizer(name: str, bits: int, unsigned: frozenset[str], chosen: dict[str, GroupQuantizer]):
    """Group ``name``'s activation quantizer: a technique's choice (:func:`group_quantizers`), else the uniform one
    of ``bits`` (unsigned where ``unsigned`` says so)."""
    return chosen[name].quantizer if name in chosen else ActQuantizer(bits, name not in unsigned)


def minmax_plan(plan: Plan, layers: Layers, stats: dict[str, TensorStats], weights: dict[str, np.ndarray]) -> Plan:
    config = plan.config
    unsigned = unsigned_groups(layers, stats, config)
    chosen = group_quantizers(layers, stats, config, {}, unsigned)
    for group in layers.groups:
        act = group_quantizer(group.name, config.a_bits, unsigned, chosen)
        scale = act.minmax_scale(stats[group.tensor].absmax)
        plan.groups[group.name] = plain_group(group, scale, act, stats[group.tensor])
    quantizer = WeightQuantizer(config.w_bits, config.weight_pair_limit)
    for spec in layers.layers:
        scales = None if spec.kind == ACT_MATMUL else quantizer.minmax_scales(weights[spec.name])
        plan.layers[spec.name] = LayerPlan(spec.name, scales, config.w_bits)
    return plan


@dataclasses.dataclass
class SearchPlanner:
    """Sequential EasyQuant / NoisyQuant search over the layer steps of one model."""

    model: onnx.ModelProto
    layers: Layers
    stats: dict[str, TensorStats]
    search_data: Dataset
    config: QuantConfig
    # the state of one run, set by ``run``
    _tensors: dict[str, gs.Tensor] = dataclasses.field(init=False, repr=False, default_factory=dict)
    _weights: dict[str, np.ndarray] = dataclasses.field(init=False, repr=False, default_factory=dict)
    _unsigned: frozenset[str] = dataclasses.field(init=False, repr=False, default=frozenset())
    _sim: Simulator | None = dataclasses.field(init=False, repr=False, default=None)
    _images: int = dataclasses.field(init=False, repr=False, default=0)
    _chosen: dict[str, GroupQuantizer] = dataclasses.field(init=False, repr=False, default_factory=dict)  # techniques'
    _bits: dict[str, int] = dataclasses.field(init=False, repr=False, default_factory=dict)  # under a bits budget
    _modules: dict[str, Module] = dataclasses.field(init=False, repr=False, default_factory=dict)
    _fallbacks: dict[str, ActQuantizer] = dataclasses.field(init=False, repr=False, default_factory=dict)  # twins'
    _techniques: list[Technique] = dataclasses.field(init=False, repr=False, default_factory=list)  # their hooks
    _finishers: list[Technique] = dataclasses.field(init=False, repr=False, default_factory=list)  # finish_layer's
    # seconds per part of the search, for the summary's timings (``simulate_s``, ``linear_search_s`` and its phases
    # ``linear.<phase>_s`` (:attr:`nq_onnx.search.groups.GroupResult.seconds`), ...)
    timings: dict[str, float] = dataclasses.field(init=False, default_factory=dict)

    _fit: int = dataclasses.field(init=False, repr=False, default=0)

    def run(self, plan: Plan, progress: Callable | None = None) -> Plan:
        """Plan every layer; ``search_data`` holds the fit images followed by the held-out ones
        (:func:`search_counts`)."""
        graph = import_graph(self.model)
        self._images = len(self.search_data)
        self._fit, _ = search_counts(self._images, self.config.search)
        self._tensors = graph.tensors()
        self._weights = float_weights(graph, self.layers)
        inputs = {k: v for feeds in self.search_data.batches(len(self.search_data)) for k, v in feeds.items()}
        self._unsigned = unsigned_groups(self.layers, self.stats, self.config)
        self._techniques = techniques.enabled(self.config)
        self._finishers = [t for t in self._techniques if t.finishes_layers()]
        for technique in self._techniques:  # mixed precision: every group's width, before the search
            assigned = technique.assign_bits(self, inputs, progress)
            if assigned is not None:
                self._bits, self._modules = assigned
        self._chosen = group_quantizers(self.layers, self.stats, self.config, self._bits, self._unsigned)
        self._fallbacks = {name: c.fallback for name, c in self._chosen.items() if c.twin is not None}
        self._sim = Simulator(
            self.model, self.layers, self.config.a_bits, self.config.w_bits, self._weights, inputs, self._unsigned,
            {g.name: self._quantizer(g) for g in self.layers.groups}, self._fallbacks,
        )
        steps = layer_steps(graph, self.layers)
        cached = None
        if not self.config.search.sequential:
            cached = self._sim.run([g.tensor for g in self.layers.groups])
        iterator = progress(steps, desc=f"search ({self.config.method.value})") if progress else steps
        for step in iterator:
            specs = [self.layers.layer(name) for name in step]
            tensors = sorted({t for spec in specs for t in spec.inputs})
            with timed(self.timings, "simulate_s"):
                acts = cached if cached is not None else self._sim.run(tensors)
            for group in self._groups_of(specs):
                self._plan_linear_group(plan, group, acts[group.tensor])
            for spec in specs:
                if spec.kind == ACT_MATMUL:
                    with timed(self.timings, "act_matmul_search_s"):
                        self._plan_act_matmul(plan, spec, acts[spec.inputs[0]], acts[spec.inputs[1]])
        return plan

    @property
    def fit_images(self) -> int:
        """How many of ``search_data``'s first images the searches fit on (the rest are held out)."""
        return self._fit

    @property
    def weights(self) -> dict[str, np.ndarray]:
        """Each linear layer's float weight, ``[K, N]``."""
        return self._weights

    @property
    def unsigned(self) -> frozenset[str]:
        """The groups whose uniform codes are unsigned (:func:`unsigned_groups`)."""
        return self._unsigned

    @property
    def tensors(self) -> dict[str, gs.Tensor]:
        """The float model's tensors by name."""
        return self._tensors

    @property
    def simulator(self) -> Simulator | None:
        """The simulation of the quantized model as planned so far (``None`` before :meth:`run`)."""
        return self._sim

    def _groups_of(self, specs: list[LayerSpec]) -> list[GroupSpec]:
        tensors = {spec.inputs[0] for spec in specs if spec.kind != ACT_MATMUL}
        return [g for g in self.layers.groups if g.tensor in tensors]

    def _plan_linear_group(self, plan: Plan, group: GroupSpec, value: np.ndarray) -> None:
        config = self.config
        specs = [self.layers.layer(name) for name in group.consumers]
        problem = GroupSearch(
            self._sample(group, value),
            tuple(linear_operand(s, self._weights[s.name], self._tensors, self._w_bits(group),
                                 config.weight_pair_limit) for s in specs),
            self._quantizer(group),
            config.search,
            config.noise if config.method.noisy and group.noisy else None,
            group_seed(config.seed, group.name),
        )
        planned_asymmetric = problem.act.asymmetric
        choice = self._chosen.get(group.name)
        with timed(self.timings, "linear_search_s"):
            if choice is not None:  # kept only where it beats the uniform quantizer on held-out rows
                problem, result = search_with_fallback(problem, choice.fallback, choice.names, choice.fallback_shifts)
            else:
                result = search_linear_group(problem)
        for phase, seconds in result.seconds.items():
            self.timings[f"linear.{phase}_s"] = self.timings.get(f"linear.{phase}_s", 0.0) + seconds
        planned = GroupPlan(group.name, group.tensor, result.scale, problem.act.bits, result.noise,
                            result.noise_shift, result.noise_amplitude, problem.act.signed,
                            _range(self.stats[group.tensor]), result.base_scale,
                            twin=self._kept_twin(group, problem.act), precision=self._modules.get(group.name),
                            low=problem.act.low)
        rows = split_images(value, self._images, self._fit)[0].reshape(-1, group.channels)
        for technique in self._techniques:
            planned = technique.plan_group(config, group, rows, planned)
        plan.groups[group.name] = planned
        fell_back = planned_asymmetric and not problem.act.asymmetric
        self._sim.set_group(group.name, planned.scale, planned.noise, problem.act.bits if fell_back else None,
                            primary=not isinstance(problem.act, ActQuantizer))
        for operand in problem.layers:
            scales = result.weight_scales[operand.name]
            with timed(self.timings, "rounding_s"):
                done = finish_layer(operand, scales, rows, problem.sample.held_out, problem.act, planned.scale,
                                    planned.noise, config, self._finishers)
            metrics = {**result.metrics[operand.name], **done.metrics}
            plan.layers[operand.name] = LayerPlan(operand.name, scales, operand.quantizer.bits, metrics, done.codes,
                                                  done.correction)
            self._sim.set_layer(operand.name, done.weight, bias_delta(planned.noise, done.weight, done.correction))

    def _kept_twin(self, group: GroupSpec, act) -> TwinSpec | None:
        """The group's twin-uniform quantizer, unless its uniform fallback ``act`` was kept."""
        choice = self._chosen.get(group.name)
        return None if isinstance(act, ActQuantizer) or choice is None else choice.twin

    def _quantizer(self, group: GroupSpec):
        """The group's activation quantizer at its width (:func:`group_quantizer`)."""
        return group_quantizer(group.name, self._bits.get(group.name, self.config.a_bits), self._unsigned,
                               self._chosen)

    def _w_bits(self, group: GroupSpec) -> int:
        """The weight bits of the layers reading ``group``: the group's own under a bits budget."""
        return self._bits.get(group.name, self.config.w_bits)

    def _sample(self, group: GroupSpec, value: np.ndarray) -> GroupSample:
        """The group's fit and held-out token rows (the samples depend on the group only; the seed drives the noise
        alone), with the rows of the tokens the output reads given ``read_token_share`` of each, and its calibrated
        range."""
        fit, rest = split_images(value, self._images, self._fit)
        search = self.config.search
        read, stats = self.layers.read_rows(value.shape), self.stats[group.tensor]

        def rows(part: np.ndarray, stream: int) -> np.ndarray:
            return search_sample(part, group.channels, search.tokens, group_rng(stream, group.name), read,
                                 search.read_token_share)

        return GroupSample(rows(fit, 0), stats.absmax, stats.channel_min, stats.channel_max,
                           None if rest is None else rows(rest, 1), stats.count)

    def _plan_act_matmul(self, plan: Plan, spec: LayerSpec, a: np.ndarray, b: np.ndarray) -> None:
        """Both operands' steps (:func:`search_act_matmul` on sampled slices of the fit images); where an operand
        is twin-uniform or split, the product is searched with its uniform fallback too, and the two-range quantizer
        kept only where its product error on the held-out images' slices is strictly the lower one (without held-out
        images, or operands that cannot be sliced, it is kept). The metrics name the two as the technique does
        (``twin_rejected``, ``mse_split_held_out``, ...)."""
        groups = [self.layers.group_of(t) for t in spec.inputs]
        absmax = (self.stats[spec.inputs[0]].absmax, self.stats[spec.inputs[1]].absmax)
        quantizers = tuple(self._quantizer(g) for g in groups)
        fit, held = zip(*(split_images(v, self._images, self._fit) for v in (a, b)))
        s_a, s_b, metrics = self._search_product(spec, groups, fit, absmax, quantizers)
        fallbacks = tuple(self._fallbacks.get(g.name, q) for g, q in zip(groups, quantizers))
        held_slices = None if fallbacks == quantizers or held[0] is None else self._slices(spec, *held)
        if held_slices is not None:
            mine, uniform = next(self._chosen[g.name].names for g, q, f in zip(groups, quantizers, fallbacks) if q != f)
            other = self._search_product(spec, groups, fit, absmax, fallbacks)
            own = _product_error(held_slices, quantizers, (s_a, s_b))
            base = _product_error(held_slices, fallbacks, other[:2])
            if base <= own:  # ties: the uniform quantizer, which needs one integer matmul where the others need two
                quantizers, (s_a, s_b, metrics) = fallbacks, other
                metrics = {**metrics, f"{mine}_rejected": 1.0}
            metrics = {**metrics, f"mse_{mine}_held_out": own, f"mse_{uniform}_held_out": base}
        for group, scale, q in zip(groups, (s_a, s_b), quantizers):
            if group.name not in plan.groups:
                plan.groups[group.name] = dataclasses.replace(
                    plain_group(group, scale, q, self.stats[group.tensor], self._kept_twin(group, q)),
                    precision=self._modules.get(group.name))
                self._sim.set_group(group.name, scale, None, primary=not isinstance(q, ActQuantizer))
        plan.layers[spec.name] = LayerPlan(spec.name, None, max(q.bits for q in quantizers), metrics)

    def _slices(self, spec: LayerSpec, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The product's sampled ``[slices, rows, cols]`` operands (the same seeded slices for fit and held-out
        images), or ``None`` where the operands are not batched matrices."""
        if a.shape[:-2] != b.shape[:-2] or a.ndim < 3:
            return None
        a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
        pick = np.sort(group_rng(0, spec.name).choice(a3.shape[0], min(ACT_MATMUL_SLICES, a3.shape[0]),
                                                      replace=False))
        return a3[pick], b3[pick]

    def _search_product(self, spec: LayerSpec, groups: list[GroupSpec], fit: tuple, absmax: tuple,
                        quantizers: tuple) -> tuple[float, float, dict]:
        sliced = self._slices(spec, *fit)
        if sliced is None:
            s_a, s_b = (q.minmax_scale(m) for q, m in zip(quantizers, absmax))
            return s_a, s_b, {}
        scores = all(g.after != "softmax" for g in groups)  # Q K^T, not A V: PTQ-ViT's ranking loss applies
        return search_act_matmul(*sliced, absmax, quantizers, self.config.search, scores)


def _product_error(slices: tuple[np.ndarray, np.ndarray], quantizers: tuple, scales: tuple) -> float:
    """``mean((q(A) q(B) - A B)^2)`` over the held-out images' sampled slices ``(A, B)``."""
    a, b = slices
    product = quantizers[0].fake_quant(a, scales[0]) @ quantizers[1].fake_quant(b, scales[1])
    return float(np.mean(np.square(product.astype(np.float64) - (a @ b).astype(np.float64))))
