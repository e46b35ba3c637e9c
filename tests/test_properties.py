"""Property-based tests: random small Linear/attention graphs through the passes.

For any graph of Linears (MatMul + optional bias Add, or Gemm with or without transB and bias), with biases
shared between layers, and an attention-style activation matmul, the converted graph passes the full checker,
loads in onnxruntime, and noise insertion plus bias folding without quantization leaves the outputs unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from conftest import init, make_model, run, tensor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from nq_onnx import QuantConfig

from nq_onnx.core import quant
from nq_onnx.passes import FoldDenoisingBias, InsertNoise, find_layers
from nq_onnx.pipeline import apply_plan, canonicalize
from nq_onnx.core.plan import GroupPlan, LayerPlan, Plan


@st.composite
def graphs(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    k = draw(st.integers(1, 12))
    n = draw(st.integers(1, 12))
    forms = draw(
        st.lists(st.sampled_from(["matmul", "matmul_nobias", "gemm_t", "gemm", "gemm_nobias"]), min_size=1, max_size=4)
    )
    share = draw(st.booleans())
    attention = draw(st.booleans())
    nodes, inits, outputs = [], [], []
    shared = init("shared_b", rng.standard_normal(n))
    if share:
        inits.append(shared)
    for i, form in enumerate(forms):
        w = rng.standard_normal((k, n)) / np.sqrt(k)
        bias = "shared_b" if share else f"b{i}"
        if not share:
            inits.append(init(bias, rng.standard_normal(n)))
        if form.startswith("matmul"):
            nodes.append(
                helper.make_node(
                    "MatMul", ["x", f"w{i}"], [f"m{i}" if form == "matmul" else f"y{i}"], name=f"/l{i}/MatMul"
                )
            )
            if form == "matmul":
                nodes.append(helper.make_node("Add", [f"m{i}", bias], [f"y{i}"], name=f"/l{i}/Add"))
            inits.append(init(f"w{i}", w))
        else:
            trans = form == "gemm_t"
            inputs = ["x", f"w{i}"] + ([] if form == "gemm_nobias" else [bias])
            nodes.append(helper.make_node("Gemm", inputs, [f"y{i}"], name=f"/l{i}/Gemm", transB=int(trans)))
            inits.append(init(f"w{i}", w.T if trans else w))
        outputs.append(tensor(f"y{i}", ["batch", n]))
    if attention:  # y0 @ y0^T: an activation x activation matmul
        nodes += [
            helper.make_node("Transpose", ["y0"], ["y0t"], name="/attn/Transpose", perm=[1, 0]),
            helper.make_node("MatMul", ["y0", "y0t"], ["scores"], name="/attn/MatMul"),
        ]
        outputs.append(tensor("scores", ["batch", "batch"]))
    used = {name for node in nodes for name in node.input}
    inits = [t for t in inits if t.name in used]
    return make_model(nodes, [tensor("x", ["batch", k])], outputs, inits), rng


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_random_graphs_convert_and_noise_folding_is_exact(case):
    model, rng = case
    model = canonicalize(model)
    layers = find_layers(gs.import_onnx(model))
    plan = Plan("digest", QuantConfig())
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for group in layers.groups:
        noise = rng.uniform(-2, 2, group.channels).astype(np.float32) if group.noisy else None
        plan.groups[group.name] = GroupPlan(group.name, group.tensor, 0.05, 8, noise)
    for spec in layers.layers:
        scales = None if spec.kind == "act_matmul" else quant.weight_scales(weights[spec.weight], 1, 8)
        plan.layers[spec.name] = LayerPlan(spec.name, scales, 8)
    x = (2 * rng.standard_normal((3, model.graph.input[0].type.tensor_type.shape.dim[1].dim_value))).astype(np.float32)
    quantized, _ = apply_plan(model, layers, plan)  # runs the full checker
    assert len(run(quantized, {"x": x})) == len(model.graph.output)

    graph = gs.import_onnx(model)
    InsertNoise(layers, plan)(graph)
    FoldDenoisingBias(layers, plan)(graph)
    graph.cleanup().toposort()
    noisy = gs.export_onnx(graph)
    onnx.checker.check_model(noisy, full_check=True)
    for want, got in zip(run(model, {"x": x}), run(noisy, {"x": x})):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 600), st.integers(1, 5000), st.integers(0, 2**31), st.booleans())
def test_folded_column_ranges_equal_numpys_per_column_min_and_max(rows, width, seed, nan):
    """The calibration pass's per-channel ranges (:func:`column_range`: rows folded into wide rows before reducing)
    are exactly numpy's ``min(0)``/``max(0)`` for any row count and width (remainder rows, widths past the folding
    width, one row), and a NaN anywhere still reaches both (the pass's finiteness check reads them)."""
    from nq_onnx.calibration.collect import column_range

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, width)) * rng.uniform(0.1, 10, width)).astype(np.float32)
    if nan:
        x[rng.integers(rows), rng.integers(width)] = np.nan
    low, high = column_range(x)
    np.testing.assert_array_equal(low, x.min(axis=0))
    np.testing.assert_array_equal(high, x.max(axis=0))
    assert low.dtype == high.dtype == np.float32 and low.shape == high.shape == (width,)
