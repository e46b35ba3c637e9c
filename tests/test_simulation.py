"""The incremental simulation the search runs on computes what the emitted QDQ graph computes, layer by layer.

A search is only as good as the arithmetic it scores: if the simulation (``calibration/simulate.py``: fake-quant
as ``Round(Clip((X + N) / s)) * s``, fake-quantized weights, denoising deltas) drifted from the graph the passes
write (noise folded into LayerNorm betas, Q/DQ pairs, ``B' = B - dq(W) N``), every searched choice would be
scored on a model nobody runs. After a full NoisyQuant search on a small timm ViT, every quantized layer is cut
out of the emitted model (from the float tensor its ``QuantizeLinear`` reads to the layer's output, bias
included), fed the simulation's own ``X + N`` and run by onnxruntime without graph optimizations (the graph's
own arithmetic); its output must equal the simulation's to float rounding. Whole models are not compared this
way: ``LN(x) + N`` and ``LN(x; beta + N)`` differ by an ulp, which moves a code on a rounding boundary now and then,
and a moved code changes everything downstream.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from nq_onnx import QuantConfig, SearchConfig

from nq_onnx.core import quant
from nq_onnx.calibration.collect import collect_stats
from nq_onnx.calibration.data import load_dataset
from nq_onnx.export import export_timm
from nq_onnx.io.model_io import load_model
from nq_onnx.pipeline import apply_plan, canonicalize, discover
from nq_onnx.core.plan import Plan
from nq_onnx.search.planner import SearchPlanner, search_counts

FLOOR_DB = 100.0  # float rounding of B' = B + delta against (XW + delta) + B is ~1e-7 relative: over 130 dB


@pytest.fixture(scope="module")
def vit(tmp_path_factory, photo_folder):
    path = tmp_path_factory.mktemp("sim") / "vit.onnx"
    export_timm("vit_small_patch16_224", path, model_kwargs=dict(img_size=64, depth=2), num_classes=10)
    return path


def searched(path, photo_folder, config):
    model, digest = load_model(path)
    model = canonicalize(model)
    layers = discover(model, config)
    calib = load_dataset(photo_folder, model, limit=config.calib_size, seed=config.seed)
    stats = collect_stats(model, [g.tensor for g in layers.groups], calib, config.batch_size)
    data = calib.head(sum(search_counts(len(calib), config.search)))
    planner = SearchPlanner(model, layers, stats, data, config)
    plan = planner.run(Plan(digest, config))
    return model, layers, plan, planner, data


def layer_output(model: onnx.ModelProto, spec) -> str:
    """A layer's output, the same tensor by name in the simulation and the emitted graph: after the bias ``Add``
    where the layer has one, else the matmul's own output (which a denoising bias ``Add`` takes over)."""
    outputs = {n.name: n.output[0] for n in model.graph.node}
    return outputs[spec.bias_node] if spec.bias_node and spec.bias_node != spec.node else outputs[spec.node]


def quantizer_input(emitted: onnx.ModelProto, spec, index: int) -> str:
    """The float tensor the ``QuantizeLinear`` of a layer's ``index``-th input reads (``X + N``, before a Clip)."""
    producers = {out: n for n in emitted.graph.node for out in n.output}
    matmul = next(n for n in emitted.graph.node if n.name == spec.node)
    q = producers[producers[matmul.input[index]].input[0]]
    clip = producers.get(q.input[0])
    source = clip.input[0] if clip is not None and clip.op_type == "Clip" else q.input[0]
    branch = producers.get(source)  # a twin-uniform branch: the range's Where (softmax) or Relu (GELU) of X + N
    if branch is not None and branch.op_type == "Where":
        return branch.input[2]
    if branch is not None and branch.op_type == "Relu":
        return branch.input[0]
    return source


def compare(path, photo_folder, config, tmp_path, break_simulation=None, plans=None) -> dict[str, float]:
    """``{layer: SQNR dB of the emitted layer against the simulation, on the same X + N}`` (the plan is appended to
    ``plans`` where given)."""
    model, layers, plan, planner, data = searched(path, photo_folder, config)
    if break_simulation:
        break_simulation(planner, plan, layers)
    if plans is not None:
        plans.append(plan)
    emitted, _ = apply_plan(model, layers, plan)
    onnx.save(emitted, tmp_path / "emitted.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sqnr = {}
    for spec in layers.layers:
        output = layer_output(model, spec)
        groups = [layers.group_of(t).name for t in spec.inputs]
        simulated = planner._sim.run([output] + [f"sim/{g}/t0" for g in groups])  # t0 = X + N
        sources = [quantizer_input(emitted, spec, i) for i in range(len(groups))]
        onnx.utils.extract_model(str(tmp_path / "emitted.onnx"), str(tmp_path / "layer.onnx"), sources, [output])
        session = ort.InferenceSession(str(tmp_path / "layer.onnx"), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {src: simulated[f"sim/{g}/t0"] for src, g in zip(sources, groups)})[0]
        sqnr[spec.name] = quant.sqnr_db(got, simulated[output])
    return sqnr


@pytest.mark.parametrize("bits,method,activations", [(8, "noisyquant", "symmetric"), (6, "noisyquant", "symmetric"),
                                                     (6, "noisyquant-ptq4vit", "symmetric"),
                                                     (8, "noisyquant", "asymmetric"), (6, "noisyquant", "asymmetric")])
def test_simulation_equals_the_emitted_qdq_graph_layer_by_layer(vit, photo_folder, bits, method, activations, tmp_path):
    """Also with PTQ4ViT's twin-uniform quantizers (A of A V, fc2's input): the two-branch graph computes what the
    simulation's one-expression twin fake-quant does; and with asymmetric activations, whose zero point the
    simulation derives from the fed step as the emitted ``QuantizeLinear`` stores it."""
    config = QuantConfig(calib_size=12, w_bits=bits, a_bits=bits, method=method, activations=activations,
                         attention_probabilities=True, reparam=False, weight_rounding="nearest",
                         bias_correction=False, balance_channels=False, search=SearchConfig(shift_min_rows=0))
    plans = []
    sqnr = compare(vit, photo_folder, config, tmp_path, plans=plans)
    twins = sorted(g.twin.kind for g in plans[0].groups.values() if g.twin is not None)
    rejected = sum(1 for p in plans[0].layers.values() if p.search.get("twin_rejected"))  # fell back to uniform
    # each twin group kept (its two-branch graph checked) or fallen back to uniform (the fallback's graph checked)
    assert len(twins) + rejected == (4 if method.endswith("ptq4vit") else 0)
    assert bool(twins) == method.endswith("ptq4vit"), twins
    asymmetric = sorted(name for name, g in plans[0].groups.items() if g.low is not None)
    if activations == "asymmetric":  # the GELU outputs (fc2's input) at least
        assert any(name.endswith("fc2") for name in asymmetric), asymmetric
    else:
        assert asymmetric == []
    assert len(sqnr) == 2 * 6 + 1  # qkv, proj, fc1, fc2, two attention matmuls per block; the head
    assert min(sqnr.values()) > FLOOR_DB, sorted(sqnr.items(), key=lambda kv: kv[1])[:3]


def test_a_broken_simulation_is_caught(vit, photo_folder, tmp_path):
    """The comparison can fail: a simulation that forgets one layer's denoising delta is caught at that layer."""
    config = QuantConfig(calib_size=12, w_bits=6, a_bits=6, search=SearchConfig(shift_min_rows=0))

    def forget_a_delta(planner, plan, layers):
        noisy = next(g for g in layers.groups if plan.groups[g.name].noise is not None)
        spec = layers.layer(noisy.consumers[0])
        planner._sim._feeds[f"sim/{spec.name}/delta"] = np.zeros(spec.out_features, np.float32)
        planner._sim._computed.clear()
        planner._sim._cache = dict(planner._sim.inputs)

    sqnr = compare(vit, photo_folder, config, tmp_path, forget_a_delta)
    assert min(sqnr.values()) < 60, sorted(sqnr.items(), key=lambda kv: kv[1])[:3]


def test_calibration_statistics_do_not_depend_on_the_batch_it_streams(vit, photo_folder, monkeypatch):
    """The calibration pass shrinks its batch to keep one batch's exposed activations within a byte budget (peak
    memory); ranges are minima and maxima, so one image per batch and all of them at once give the same bits."""
    import nq_onnx.calibration.collect as collect

    model = canonicalize(load_model(vit)[0])
    layers = discover(model, QuantConfig())
    tensors = [g.tensor for g in layers.groups]
    data = load_dataset(photo_folder, model, limit=12, seed=0)
    monkeypatch.setattr(collect, "OUTPUT_BUDGET", 1)  # every batch one image
    one = collect_stats(model, tensors, data, 8)
    monkeypatch.setattr(collect, "OUTPUT_BUDGET", 1 << 40)
    eight = collect_stats(model, tensors, data, 8)
    assert one.keys() == eight.keys() == set(tensors)
    for name in tensors:
        np.testing.assert_array_equal(one[name].channel_min, eight[name].channel_min)
        np.testing.assert_array_equal(one[name].channel_max, eight[name].channel_max)
        assert one[name].count == eight[name].count


def test_specialized_steps_compute_what_the_whole_simulation_graph_does(vit, photo_folder, monkeypatch):
    """Each simulation step folds the plan into its nodes (a planned group's ``Where`` becomes the quantized
    branch, a zero noise or delta ``Add`` its input, dead quantizers go): after a NoisyQuant search, every group
    input and every layer output equals, bit for bit, what the unfolded graph computes, and no step ran a select
    on a fed ``on`` flag."""
    from nq_onnx.calibration.simulate import Simulator

    config = QuantConfig(calib_size=12, w_bits=6, a_bits=6, search=SearchConfig(shift_min_rows=0))
    model, layers, plan, planner, _ = searched(vit, photo_folder, config)
    assert any(g.noise is not None for g in plan.groups.values())
    assert any(g.noise is None for g in plan.groups.values())
    sim = planner._sim
    wanted = sorted({g.tensor for g in layers.groups} | {layer_output(model, s) for s in layers.layers})
    selects = []
    original = Simulator._specialize

    def watched(self, nodes, outputs):
        kept, alias = original(self, nodes, outputs)
        selects.extend(n for n in kept if n.op_type == "Where" and n.input[0] in self._feeds)
        return kept, alias

    def rerun() -> dict[str, np.ndarray]:
        sim._computed.clear()
        sim._cache = dict(sim.inputs)
        return {k: v.copy() for k, v in sim.run(wanted).items()}

    monkeypatch.setattr(Simulator, "_specialize", watched)
    folded = rerun()
    assert selects == []
    quiet = next(g for g in layers.groups if plan.groups[g.name].noise is None)  # X + 0 is X, already computed
    np.testing.assert_array_equal(sim.run([f"sim/{quiet.name}/t0"])[f"sim/{quiet.name}/t0"], folded[quiet.tensor])
    monkeypatch.setattr(Simulator, "_specialize", lambda self, nodes, outputs: (nodes, {}))
    whole = rerun()
    for name in wanted:
        np.testing.assert_array_equal(folded[name], whole[name], err_msg=name)
