"""A float simulation of the partly quantized model, for searching layer by layer in order.

The search of a layer must see the activations that reach it once every earlier layer is quantized.
Rather than rebuilding a model per layer, one simulation model is built where every group input ``X`` is
replaced by ::

    Where(on_g, s_g * round(clip((X + N_g) / s_g, lo, hi)), X)

(the quantizer's own float-ONNX form, :meth:`nq_onnx.core.quantizers.ActQuantizer.simulate`)
and every weight and bias delta becomes a graph input, so a single onnxruntime session serves the whole
search: a layer not yet planned is fed ``on = false`` and its float weight; a planned one its step, noise,
fake-quantized weight ``dq(q(W))`` and denoising delta ``-N dq(W)``. ``round`` is ONNX ``Round`` (half to
even), the same rounding as ``QuantizeLinear``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from nq_onnx.core.external_data import carry_source_dir
from nq_onnx.calibration.runtime import session
from nq_onnx.passes.base import import_graph
from nq_onnx.passes.find_layers import ACT_MATMUL, GroupSpec, Layers
from nq_onnx.core.quantizers import ActQuantizer, WeightQuantizer


def _names(group: str) -> dict[str, str]:
    names = {k: f"sim/{group}/{k}" for k in ("noise", "scale", "on", "neg_low", "primary")}
    return names | {"lo": f"sim/{group}/code_lo", "hi": f"sim/{group}/code_hi"}  # fed code ranges (fed_codes)


def build_simulation(model: onnx.ModelProto, layers: Layers, a_bits: int, unsigned: frozenset[str] = frozenset(),
                     quantizers: dict | None = None, fed_codes: bool = False,
                     fallbacks: dict | None = None) -> onnx.ModelProto:
    """``unsigned`` names the groups quantized with unsigned codes (``[0, 2^b - 1]``); ``quantizers`` gives a group
    another quantizer (a twin-uniform one) by name. With ``fed_codes`` every uniform group's code range ``[lo,
    hi]`` is a graph input too (``sim/<group>/code_lo``, ``.../code_hi``), so one model simulates any width per
    group. ``fallbacks`` gives a group with another quantizer the uniform one it falls back to where it loses:
    both are simulated and the fed ``sim/<group>/primary`` chooses."""
    graph = import_graph(model)
    tensors = graph.tensors()
    nodes = {n.name: n for n in graph.nodes}
    for group in layers.groups:
        x = tensors[group.tensor]
        names = _names(group.name)
        noise = gs.Variable(names["noise"], dtype=np.float32, shape=[max(group.channels, 1)])
        scale = gs.Variable(names["scale"], dtype=np.float32, shape=[])
        on = gs.Variable(names["on"], dtype=np.bool_, shape=[])
        graph.inputs.extend([noise, scale, on])
        noisy = gs.Variable(f"sim/{group.name}/t0", dtype=np.float32)
        chosen = gs.Variable(f"sim/{group.name}/t5", dtype=np.float32)
        quantizer = (quantizers or {}).get(group.name) or ActQuantizer(a_bits, group.name not in unsigned)
        quantize, fake = quantizer.simulate(f"sim/{group.name}", noisy, scale)
        if group.name in (fallbacks or {}):
            quantize, fake = _with_fallback(f"sim/{group.name}", quantize, fake, fallbacks[group.name], noisy, scale,
                                            graph)
        if getattr(quantizer, "asymmetric", False):  # its anchor fed: a fallback to symmetric codes feeds 2^(b-1) s
            div = next(node for node in quantize if node.op == "Div" and node.inputs[0].name.endswith("/neg_low"))
            div.inputs[0] = gs.Variable(names["neg_low"], dtype=np.float32, shape=[])
            graph.inputs.append(div.inputs[0])
        elif fed_codes and isinstance(quantizer, ActQuantizer):
            clip = next(node for node in quantize if node.op == "Clip")
            for index, key in ((1, "lo"), (2, "hi")):
                clip.inputs[index] = gs.Variable(names[key], dtype=np.float32, shape=[])
                graph.inputs.append(clip.inputs[index])
        graph.nodes += [gs.Node("Add", inputs=[x, noise], outputs=[noisy]), *quantize,
                        gs.Node("Where", inputs=[on, fake, x], outputs=[chosen])]
        for name in group.consumers:
            spec = layers.layer(name)
            node = nodes[spec.node]
            node.inputs[spec.inputs.index(group.tensor)] = chosen
    for spec in layers.layers:
        if spec.kind == ACT_MATMUL:
            continue
        node = nodes[spec.node]
        weight = node.inputs[1]
        fed = gs.Variable(f"sim/{spec.name}/weight", dtype=np.float32, shape=list(weight.values.shape))
        delta = gs.Variable(f"sim/{spec.name}/delta", dtype=np.float32, shape=[spec.out_features])
        graph.inputs.extend([fed, delta])
        node.inputs[1] = fed
        out = node.outputs[0]
        inner = gs.Variable(f"sim/{spec.name}/raw", dtype=np.float32)
        node.outputs[0] = inner
        graph.nodes.append(gs.Node("Add", inputs=[inner, delta], outputs=[out]))
    graph.cleanup().toposort()
    sim = gs.export_onnx(graph)
    sim.ir_version = model.ir_version
    return carry_source_dir(model, sim)


def _with_fallback(prefix: str, nodes: list[gs.Node], fake: gs.Variable, fallback: ActQuantizer, x: gs.Tensor,
                   scale: gs.Tensor, graph: gs.Graph) -> tuple[list[gs.Node], gs.Variable]:
    """``Where(primary, fake, fallback(x))``: the group's quantizer or, with ``primary`` fed false, its fallback
    at the same fed step."""
    other_nodes, other = fallback.simulate(f"{prefix}/fallback", x, scale)
    primary = gs.Variable(f"{prefix}/primary", dtype=np.bool_, shape=[])
    graph.inputs.append(primary)
    chosen = gs.Variable(f"{prefix}/chosen", dtype=np.float32)
    return nodes + other_nodes + [gs.Node("Where", inputs=[primary, fake, other], outputs=[chosen])], chosen


def float_feeds(layers: Layers, float_weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The simulation's inputs that make it the float model: every group off, no noise, float weights."""
    feeds: dict[str, np.ndarray] = {}
    for group in layers.groups:
        names = _names(group.name)
        feeds[names["noise"]] = np.zeros(max(group.channels, 1), np.float32)
        feeds[names["scale"]] = np.array(1.0, np.float32)
        feeds[names["on"]] = np.array(False)
    for spec in layers.layers:
        if spec.kind != ACT_MATMUL:
            feeds[f"sim/{spec.name}/weight"] = float_weights[spec.name]
            feeds[f"sim/{spec.name}/delta"] = np.zeros(spec.out_features, np.float32)
    return feeds


@dataclasses.dataclass
class Simulator:
    """Runs the simulation model on a fixed, in-memory set of inputs with the current partial plan.

    Work is incremental: a tensor computed once every layer upstream of it is planned never changes again,
    so it is kept while some node still needs it, and each request runs only the nodes between the kept
    tensors and the requested ones (for a ViT: one block's worth of ops per step, not the whole model).
    """

    model: onnx.ModelProto
    layers: Layers
    a_bits: int
    w_bits: int
    float_weights: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]
    unsigned: frozenset[str] = frozenset()
    quantizers: dict | None = None  # groups with another quantizer than ``a_bits`` uniform
    fallbacks: dict | None = None  # the uniform quantizer such a group falls back to (``set_group(primary=False)``)

    def __post_init__(self) -> None:
        self._sim = build_simulation(self.model, self.layers, self.a_bits, self.unsigned, self.quantizers,
                                     fallbacks=self.fallbacks)
        graph = self._sim.graph
        self._nodes = list(graph.node)
        self._producer = {out: i for i, node in enumerate(self._nodes) for out in node.output if out}
        self._consumers: dict[str, set[int]] = {}
        for i, node in enumerate(self._nodes):
            for name in node.input:
                self._consumers.setdefault(name, set()).add(i)
        self._initializers = {t.name: t for t in graph.initializer}
        typed = onnx.shape_inference.infer_shapes(self._sim)
        self._types = {
            v.name: v.type.tensor_type.elem_type
            for v in list(typed.graph.value_info) + list(typed.graph.output) + list(typed.graph.input)
        }
        self._computed: set[int] = set()
        self._cache: dict[str, np.ndarray] = dict(self.inputs)
        self._feeds: dict[str, np.ndarray] = float_feeds(self.layers, self.float_weights)
        for group, quantizer in (self.quantizers or {}).items():
            if getattr(quantizer, "asymmetric", False):
                self._feeds[_names(group)["neg_low"]] = np.array(-quantizer.low, np.float32)
        for group in self.fallbacks or {}:
            self._feeds[_names(group)["primary"]] = np.array(True)

    def set_group(self, name: str, scale: float, noise: np.ndarray | None, symmetric_bits: int | None = None,
                  primary: bool = True) -> None:
        """A planned group's step and noise; ``symmetric_bits``: an asymmetric group planned symmetric after all,
        simulated with the zero point ``z = 2^(b-1)`` that gives the symmetric codes (``2^(b-1) s / s`` is exact);
        ``primary`` false: a group with a fallback planned with it."""
        names = _names(name)
        if name in (self.fallbacks or {}):
            self._feeds[names["primary"]] = np.array(primary)
        self._feeds[names["scale"]] = np.array(scale, np.float32)
        self._feeds[names["on"]] = np.array(True)
        if noise is not None:
            self._feeds[names["noise"]] = noise.astype(np.float32)
        if symmetric_bits is not None:
            self._feeds[names["neg_low"]] = np.array(np.float32(2 ** (symmetric_bits - 1)) * np.float32(scale))

    @property
    def feeds(self) -> dict[str, np.ndarray]:
        """The graph inputs the plan so far sets (steps, noise, fake-quantized weights, deltas), a copy."""
        return dict(self._feeds)

    def set_layer(self, name: str, fake_weight: np.ndarray, delta: np.ndarray | None) -> None:
        self._feeds[f"sim/{name}/weight"] = fake_weight.astype(np.float32)
        if delta is not None:
            self._feeds[f"sim/{name}/delta"] = delta.astype(np.float32)

    def run(self, tensors: list[str]) -> dict[str, np.ndarray]:
        """Values of ``tensors`` on all inputs; every layer upstream of them must already be set."""
        todo = self._nodes_for(tensors)
        if todo:
            produced = {out for i in todo for out in self._nodes[i].output if out}
            done = self._computed | set(todo)
            keep = sorted(t for t in produced if t in tensors or (self._consumers.get(t, set()) - done))
            values = self._run_nodes(todo, keep)
            self._computed = done
            self._cache.update(values)
            self._cache = {
                k: v
                for k, v in self._cache.items()
                if k in self.inputs or k in tensors or (self._consumers.get(k, set()) - self._computed)
            }
        return {t: self._cache[t] for t in tensors}

    def _nodes_for(self, tensors: list[str]) -> list[int]:
        needed: set[int] = set()
        stack = [t for t in tensors if t not in self._cache]
        while stack:
            name = stack.pop()
            index = self._producer.get(name)
            if index is None or index in needed:
                continue
            needed.add(index)
            stack.extend(t for t in self._nodes[index].input if t and t not in self._cache)
        return sorted(needed)

    def _run_nodes(self, todo: list[int], outputs: list[str]) -> dict[str, np.ndarray]:
        nodes, alias = self._specialize([self._nodes[i] for i in todo], outputs)
        source = {name: _resolve(alias, name) for name in outputs}
        produced = {out for node in nodes for out in node.output}
        outputs = sorted({t for t in source.values() if t in produced})
        if not outputs:  # every requested tensor is one already computed under another name
            return {name: self._cache[t] for name, t in source.items()}
        external = sorted({t for node in nodes for t in node.input if t and t not in produced})
        feeds, inputs, initializers = {}, [], []
        for name in external:
            if name in self._initializers:
                initializers.append(self._initializers[name])
            elif name in self._cache:
                feeds[name] = self._cache[name]
            elif name in self._feeds:
                feeds[name] = self._feeds[name]
            else:
                raise RuntimeError(f"simulation needs {name!r}, which nothing provides")
        for name, value in feeds.items():
            elem = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
            inputs.append(onnx.helper.make_tensor_value_info(name, elem, value.shape))
        outs = [
            onnx.helper.make_tensor_value_info(n, self._types.get(n) or onnx.TensorProto.FLOAT, None) for n in outputs
        ]
        graph = onnx.helper.make_graph(nodes, "sim_step", inputs, outs, initializers)
        sub = onnx.helper.make_model(graph, opset_imports=self._sim.opset_import, ir_version=self._sim.ir_version)
        sess = session(carry_source_dir(self._sim, sub), optimize=False)
        values = dict(zip(outputs, sess.run(outputs, feeds)))
        return {name: values[t] if t in values else self._cache[t] for name, t in source.items()}

    def _specialize(self, nodes: list[onnx.NodeProto], outputs: list[str]) -> tuple[list[onnx.NodeProto], dict]:
        """The step's nodes with the plan so far folded in, and which tensor each dropped node's output equals.

        ``Where(on, fake, x)`` is ``fake`` for a planned group and ``x`` for another; ``x + N`` and a layer's
        ``raw + delta`` are ``x`` and ``raw`` where the fed ``N`` or delta is zero (``-0.0 + 0`` is ``+0.0``:
        the same value); a quantizer whose result nothing reads any more is dropped. The values are the
        unspecialized graph's, without its per-element selects and adds on every group input."""
        alias: dict[str, str] = {}
        kept = []
        for node in nodes:
            fed = [self._feeds.get(name) for name in node.input]
            if node.op_type == "Where" and fed[0] is not None and fed[0].ndim == 0:
                alias[node.output[0]] = node.input[1] if bool(fed[0]) else node.input[2]
            elif node.op_type == "Add" and fed[1] is not None and not np.any(fed[1]) and _is_sim_add(node):
                alias[node.output[0]] = node.input[0]
            else:
                kept.append(node)
        if not alias:
            return nodes, alias
        for i, node in enumerate(kept):
            if any(name in alias for name in node.input):
                node = onnx.NodeProto.FromString(node.SerializeToString())
                node.input[:] = [_resolve(alias, name) if name else name for name in node.input]
                kept[i] = node
        needed = {_resolve(alias, name) for name in outputs}
        live = []
        for node in reversed(kept):  # nodes are in topological order: drop those nothing needed reads
            if any(out in needed for out in node.output):
                live.append(node)
                needed.update(name for name in node.input if name)
        return live[::-1], alias


def _resolve(alias: dict[str, str], name: str) -> str:
    while name in alias:
        name = alias[name]
    return name


def _is_sim_add(node: onnx.NodeProto) -> bool:
    """Whether ``node`` is one the simulation added: a group's ``X + N`` or a layer's ``raw + delta``."""
    return node.input[1].startswith("sim/") and node.input[1].endswith(("/noise", "/delta"))


def output_sensitivities(model: onnx.ModelProto, layers: Layers, float_weights: dict[str, np.ndarray],
                         inputs: dict[str, np.ndarray], unsigned: frozenset[str],
                         steps: dict[str, dict[int, float]], choices: tuple[int, ...],
                         base: int | None = None, progress=None) -> dict[str, dict[int, float]]:
    """Per group and bit-width ``b``: the mean squared error of the model's first output against the float
    model's, on ``inputs``, with that group quantized at ``b`` bits (its input with the step ``steps[group][b]``,
    its layers' weights MinMax).

    With ``base = None`` every other group stays float: the group's error alone. With a ``base`` width every
    other group is quantized at ``base`` bits too (the operating point of the uniform model at that width), and
    the figure is the change from that model's error, ``MSE(group at b, the rest at base) - MSE(all at base)``
    (0 at ``b = base``, negative where a wider group helps): a narrow group's error adds to the errors the others
    already make, which its error alone does not show. One simulation model with each group's code range fed
    (:func:`build_simulation`), one forward pass per group and width."""
    def quantized(group, bits: int) -> dict[str, np.ndarray]:
        feeds = {}
        for consumer in group.consumers:
            if layers.layer(consumer).kind != ACT_MATMUL:
                w, weight = WeightQuantizer(bits), float_weights[consumer]
                feeds[f"sim/{consumer}/weight"] = w.fake_quant(weight, w.minmax_scales(weight))
        names = _names(group.name)
        return feeds | {names["scale"]: np.array(steps[group.name][bits], np.float32), names["on"]: np.array(True)}

    sim = WidthSimulation(model, layers, float_weights, inputs, unsigned, max(choices), quantized)
    return sim.sensitivities(choices, base, progress)


def searched_sensitivities(model: onnx.ModelProto, layers: Layers, float_weights: dict[str, np.ndarray],
                           inputs: dict[str, np.ndarray], unsigned: frozenset[str],
                           searched: dict[int, dict[str, np.ndarray]], base: int,
                           progress=None) -> dict[str, dict[int, float]]:
    """Per group and bit-width ``b``: ``MSE(group at b, the rest at base) - MSE(all at base)`` of the model's
    first output against the float model's, on ``inputs``, where "at ``b``" is what the uniform search at ``b``
    bits chose for that group (``searched[b]``: a finished :class:`Simulator`'s feeds, :attr:`Simulator.feeds`):
    its step, noise, its layers' fake-quantized weights and denoising deltas. The searched quantizers, not MinMax
    ones, are what the mixed model will run, so a wider group's figure is the gain the search leaves room for.
    Uniform activation quantizers only (a twin-uniform quantizer's constants depend on its width)."""
    sim = WidthSimulation(model, layers, float_weights, inputs, unsigned, max(searched),
                          searched_feeds(layers, searched))
    return sim.sensitivities(tuple(sorted(searched)), base, progress)


def searched_feeds(layers: Layers, searched: dict[int, dict[str, np.ndarray]]):
    """``quantized(group, bits)`` for :class:`WidthSimulation`: the group's feeds from ``searched[bits]`` (a finished
    :class:`Simulator`'s :attr:`~Simulator.feeds`): step, noise, its layers' fake-quantized weights and deltas."""

    def quantized(group, bits: int) -> dict[str, np.ndarray]:
        names = _names(group.name)
        keys = [names[k] for k in ("noise", "scale", "on")]
        for consumer in group.consumers:
            if layers.layer(consumer).kind != ACT_MATMUL:
                keys += [f"sim/{consumer}/weight", f"sim/{consumer}/delta"]
        return {k: searched[bits][k] for k in keys}

    return quantized


class WidthSimulation:
    """The model's first output with any width per group: one simulation with fed code ranges
    (:func:`build_simulation`), run on ``inputs`` in batches of ``BATCH`` images; a group's feeds at ``b`` bits are
    ``quantized(group, b)`` plus its code range. The float model's output on the same inputs is the reference."""

    BATCH = 8

    def __init__(self, model: onnx.ModelProto, layers: Layers, float_weights: dict[str, np.ndarray],
                 inputs: dict[str, np.ndarray], unsigned: frozenset[str], max_bits: int, quantized) -> None:
        self.layers, self.unsigned, self.inputs, self.quantized = layers, unsigned, inputs, quantized
        sim = build_simulation(model, layers, max_bits, unsigned, fed_codes=True)
        self._sess = session(carry_source_dir(model, sim), optimize=False)
        self._name = self._sess.get_outputs()[0].name
        self.floats = float_feeds(layers, float_weights)
        for group in layers.groups:
            names, (lo, hi) = _names(group.name), ActQuantizer(max_bits, group.name not in unsigned).code_range
            self.floats[names["lo"]], self.floats[names["hi"]] = np.array(lo, np.float32), np.array(hi, np.float32)
        self.reference = self.run(self.floats)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        images = len(next(iter(self.inputs.values())))
        return np.concatenate([
            self._sess.run([self._name], feeds | {k: v[i: i + self.BATCH] for k, v in self.inputs.items()})[0]
            for i in range(0, images, self.BATCH)]).astype(np.float64)

    def feeds(self, bits: dict[str, int]) -> dict[str, np.ndarray]:
        """Every group named in ``bits`` at its width, the others float."""
        feeds = dict(self.floats)
        for group in self.layers.groups:
            if group.name in bits:
                feeds |= self.group_feeds(group, bits[group.name])
        return feeds

    def group_feeds(self, group: GroupSpec, bits: int) -> dict[str, np.ndarray]:
        names = _names(group.name)
        lo, hi = ActQuantizer(bits, group.name not in self.unsigned).code_range
        return self.quantized(group, bits) | {names["lo"]: np.array(lo, np.float32),
                                              names["hi"]: np.array(hi, np.float32)}

    def mse(self, feeds: dict[str, np.ndarray]) -> float:
        return float(np.mean((self.run(feeds) - self.reference) ** 2))

    def sensitivities(self, choices: tuple[int, ...], base: int | None, progress=None) -> dict[str, dict[int, float]]:
        """The output MSE of every (group, width) in ``choices`` with every other group at ``base`` (float: ``base
        = None``), less the MSE with every group there; ``progress(iterable, total=None, desc=None)`` sees the
        groups go by."""
        if base is not None and base not in choices:
            raise ValueError(f"the operating point's width {base} is not one of {choices}")
        groups = self.layers.groups
        start = self.feeds({} if base is None else dict.fromkeys((g.name for g in groups), base))
        floor = 0.0 if base is None else self.mse(start)
        shown = groups if progress is None else progress(groups, total=len(groups))
        return {g.name: {bits: 0.0 if bits == base else self.mse(start | self.group_feeds(g, bits)) - floor
                         for bits in choices} for g in shown}
