"""Graph passes on tiny hand-written graphs: exactness of noise + denoising bias, weight axes, bias handling."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import init, make_model, mlp_model, run, tensor
from onnx import helper

from nq_onnx import QuantConfig
from nq_onnx.passes import (
    DecomposeGemm,
    FoldDenoisingBias,
    InsertNoise,
    InsertQDQ,
    PassConditionError,
    PassResult,
    Role,
    Sequential,
    find_layers,
)
from nq_onnx.pipeline import apply_plan, canonicalize
from nq_onnx.core.plan import GroupPlan, LayerPlan, Plan
from nq_onnx.core import quant
from nq_onnx.core.quantizers import WeightQuantizer


def noisy_plan(model: onnx.ModelProto, rng: np.random.Generator, amplitude: float = 2.0, bits: int = 8):
    layers = find_layers(gs.import_onnx(model))
    plan = Plan("digest", QuantConfig(w_bits=bits, a_bits=bits, weight_dtype="auto"))  # unconstrained codes
    for group in layers.groups:
        noise = (amplitude * rng.uniform(-1, 1, group.channels)).astype(np.float32) if group.noisy else None
        plan.groups[group.name] = GroupPlan(group.name, group.tensor, 0.05, bits, noise)
    return layers, plan


def apply(model, layers, plan, passes):
    graph = gs.import_onnx(model)
    for graph_pass in passes:
        graph_pass(layers, plan)(graph)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    onnx.checker.check_model(out, full_check=True)
    return out


def gemm_model(rng, k=9, n=6, m=4, alpha=0.7, beta=1.3):
    """Two Gemm layers on one input: ``transB=1`` with a bias and ``alpha``/``beta``, ``transB=0`` without bias."""
    nodes = [helper.make_node("Gemm", ["x", "w1", "c1"], ["y1"], name="/head/Gemm", transB=1, alpha=alpha, beta=beta),
             helper.make_node("Gemm", ["x", "w2"], ["y2"], name="/aux/Gemm")]
    inits = [init("w1", rng.standard_normal((n, k))), init("c1", rng.standard_normal(n)),
             init("w2", rng.standard_normal((k, m)))]
    return make_model(nodes, [tensor("x", ["batch", k])], [tensor("y1", ["batch", n]), tensor("y2", ["batch", m])],
                      inits)


def shared_bias_model(rng, k=8, n=5):
    """Two Linears on different inputs sharing one bias initializer (as deduplicating exporters emit)."""
    nodes = [helper.make_node("MatMul", ["a", "wa"], ["a0"], name="/a/MatMul"),
             helper.make_node("Add", ["a0", "b"], ["ya"], name="/a/Add"),
             helper.make_node("MatMul", ["c", "wc"], ["c0"], name="/c/MatMul"),
             helper.make_node("Add", ["c0", "b"], ["yc"], name="/c/Add")]
    inits = [init("wa", rng.standard_normal((k, n))), init("wc", rng.standard_normal((k, n))),
             init("b", rng.standard_normal(n))]
    return make_model(nodes, [tensor("a", ["batch", 3, k]), tensor("c", ["batch", 3, k])],
                      [tensor("ya", ["batch", 3, n]), tensor("yc", ["batch", 3, n])], inits)


def feeds_for(model, rng, batch=3):
    out = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.dim_value else batch for d in value.type.tensor_type.shape.dim]
        out[value.name] = (3 * rng.standard_normal(dims)).astype(np.float32)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_noise_and_denoising_bias_are_exact_without_quantization(seed):
    rng = np.random.default_rng(seed)
    k, hidden, out = (int(v) for v in rng.integers(2, 40, size=3))
    builders = [lambda: mlp_model(rng, tokens=int(rng.integers(1, 9)), k=k, hidden=hidden, out=out,
                                  second_bias=bool(seed % 2)),
                lambda: gemm_model(rng, k=k, n=hidden, m=out, alpha=float(rng.uniform(0.2, 2)),
                                   beta=float(rng.uniform(0.2, 2))),
                lambda: shared_bias_model(rng, k=k, n=out)]
    for build in builders:
        original = build()
        model = canonicalize(original)
        layers, plan = noisy_plan(model, rng, amplitude=float(rng.uniform(0.5, 5)))
        noisy = apply(model, layers, plan, (InsertNoise, FoldDenoisingBias))
        adds = [n for n in noisy.graph.node if n.op_type == "Add" and n.input[1].endswith("/noise")]
        assert len(adds) == sum(g.noisy for g in layers.groups) > 0
        feeds = feeds_for(model, rng)
        for want, got in zip(run(original, feeds), run(noisy, feeds)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_shared_bias_is_copied_not_edited():
    rng = np.random.default_rng(1)
    model = shared_bias_model(rng)
    layers, plan = noisy_plan(model, rng)
    noisy = apply(model, layers, plan, (InsertNoise, FoldDenoisingBias))
    adds = {n.name: n for n in noisy.graph.node if n.op_type == "Add" and n.name in ("/a/Add", "/c/Add")}
    biases = {name: node.input[1] for name, node in adds.items()}
    assert biases["/a/Add"] != biases["/c/Add"]
    original = onnx.numpy_helper.to_array(model.graph.initializer[2])
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in noisy.graph.initializer}
    assert not np.array_equal(stored[biases["/a/Add"]], original)
    assert not np.array_equal(stored[biases["/c/Add"]], original)


def test_missing_bias_gets_one_with_the_denoising_term():
    rng = np.random.default_rng(2)
    model = mlp_model(rng, second_bias=False)
    layers, plan = noisy_plan(model, rng)
    fc2 = layers.layer("mlp.fc2")
    assert fc2.bias is None
    noisy = apply(model, layers, plan, (InsertNoise, FoldDenoisingBias))
    added = [n for n in noisy.graph.node if n.name == "mlp.fc2/add_denoising_bias"]
    assert len(added) == 1
    w = onnx.numpy_helper.to_array(model.graph.initializer[2]).astype(np.float64)
    bias = next(onnx.numpy_helper.to_array(t) for t in noisy.graph.initializer if t.name == added[0].input[1])
    noise = plan.groups[layers.group_of(fc2.inputs[0]).name].noise.astype(np.float64)
    np.testing.assert_allclose(bias, -(noise @ w), rtol=1e-6, atol=1e-6)


def test_weight_channels_lie_on_axis_1_for_matmul_and_canonicalized_gemm():
    """``Gemm`` (``transB`` 0 and 1, ``alpha``/``beta``) becomes a ``MatMul`` whose ``[K, N]`` weight has its output
    channels on axis 1, like every other layer; the quantized model still computes the float one's outputs."""
    rng = np.random.default_rng(3)
    for original, names in ((mlp_model(rng), ["mlp.fc1", "mlp.fc2"]), (gemm_model(rng), ["head", "aux"])):
        model = canonicalize(original)
        layers = find_layers(gs.import_onnx(model))
        assert [s.name for s in layers.layers] == names
        plan = Plan("digest", QuantConfig())
        weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        for spec in layers.layers:
            w = weights[spec.weight]
            assert w.shape == (spec.in_features, spec.out_features)
            scales = WeightQuantizer(8, quant.KERNEL_PAIR_LIMIT).minmax_scales(w)  # the default's int8-paired
            plan.layers[spec.name] = LayerPlan(spec.name, scales, 8)
        for group in layers.groups:
            plan.groups[group.name] = GroupPlan(group.name, group.tensor, 0.2, 8)  # range ±25
        out, _ = apply_plan(model, layers, plan)
        dqs = {n.name: n for n in out.graph.node if n.op_type == "DequantizeLinear" and "weight" in n.name}
        for spec in layers.layers:
            assert helper.get_attribute_value(dqs[f"{spec.name}/weight_dequantize"].attribute[0]) == 1
        feeds = feeds_for(model, rng)
        for want, got in zip(run(original, feeds), run(out, feeds)):
            assert quant.sqnr_db(want, got) > 25


def test_layers_are_found_only_in_the_canonical_form():
    """A weight ``Gemm`` is a precondition failure of ``find_layers``, not a second code path in every pass."""
    with pytest.raises(ValueError, match="canonicalize"):
        find_layers(gs.import_onnx(gemm_model(np.random.default_rng(5))))


@pytest.mark.parametrize("beta", [1.0, 1.7])
def test_decompose_gemm_adds_a_computed_c_in_2d(beta):
    """``alpha X W + beta C`` with a computed ``[M, N]`` ``C``: added after the ``Squeeze`` (a 3-D
    ``[M, 1, N] + [M, N]`` would broadcast to ``[M, M, N]``), scaled by a ``Mul`` where ``beta != 1``; exact."""
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Relu", ["c"], ["c_relu"], name="/c/Relu"),
             helper.make_node("Gemm", ["x", "w", "c_relu"], ["y"], name="/head/Gemm", alpha=0.5, beta=beta)]
    model = make_model(nodes, [tensor("x", ["batch", 6]), tensor("c", ["batch", 4])], [tensor("y", ["batch", 4])],
                       [init("w", rng.standard_normal((6, 4)))])
    out = canonicalize(model)
    assert "Gemm" not in {n.op_type for n in out.graph.node}
    feeds = feeds_for(model, rng)
    np.testing.assert_allclose(run(out, feeds)[0], run(model, feeds)[0], rtol=1e-6, atol=1e-6)


def test_zero_noise_gives_exactly_the_plain_qdq_graph():
    rng = np.random.default_rng(4)
    model = mlp_model(rng)
    layers, plan = noisy_plan(model, rng)
    for spec in layers.layers:
        plan.layers[spec.name] = LayerPlan(spec.name, np.full(spec.out_features, 0.01, np.float32), 8)
    groups = plan.groups.items()
    plain = Plan("digest", plan.config, {k: GroupPlan(g.name, g.tensor, g.scale, g.bits) for k, g in groups},
                 plan.layers)
    zero = Plan("digest", plan.config, {k: GroupPlan(g.name, g.tensor, g.scale, g.bits, np.zeros_like(g.noise))
                                        for k, g in plan.groups.items()}, plan.layers)
    a, _ = apply_plan(model, layers, plain)
    b, _ = apply_plan(model, layers, zero)
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def reference_codes(x: np.ndarray, scale: np.float32, bits: int, signed: bool = True) -> np.ndarray:
    """Written independently of nq_onnx.core.quant: float32 division, ties to even, b-bit saturation, + zero point."""
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    q = np.rint(np.float32(x) / np.float32(scale)).clip(lo, hi)
    return (q + (128 if signed else 0)).astype(np.uint8)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [8, 6, 5, 4])
def test_qdq_integer_codes_equal_numpy_reference_bit_for_bit(bits, signed):
    rng = np.random.default_rng(bits)
    model = mlp_model(rng, tokens=16, k=24)
    layers, plan = noisy_plan(model, rng, bits=bits)
    plan.groups[layers.groups[0].name].signed = signed
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for spec in layers.layers:
        plan.layers[spec.name] = LayerPlan(spec.name, quant.weight_scales(weights[spec.weight], 1, bits), bits)
    group = layers.groups[0]
    scale = np.float32(0.0371)
    plan.groups[group.name].scale = float(scale)
    out, _ = apply_plan(model, layers, plan)
    code_tensor = f"{group.name}/input_quantized"
    out.graph.output.append(helper.make_tensor_value_info(code_tensor, onnx.TensorProto.UINT8, None))
    x = (rng.standard_normal((4, 16, 24)) * 3).astype(np.float32)
    x.flat[:40] = (np.arange(40) - 20 + 0.5) * scale  # exact ties, both signs, beyond the clip range too
    got = run(out, {"x": x}, [code_tensor])[0]
    noisy_x = x + plan.groups[group.name].noise
    np.testing.assert_array_equal(got, reference_codes(noisy_x, scale, bits, signed))
    lo, hi = (128 - 2 ** (bits - 1), 128 + 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    assert got.min() == lo and got.max() == hi  # the clip range was reached, and not left
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    for spec in layers.layers:
        w = weights[spec.weight]
        s = (np.abs(w).max(axis=0) / np.float32(2 ** (bits - 1) - 1)).astype(np.float32)
        codes = stored[f"{spec.name}/weight_quantized"].astype(np.int64) - stored[f"{spec.name}/weight_zero_point"]
        np.testing.assert_array_equal(codes, np.rint(w / s[None, :]).astype(np.int64))
        assert np.abs(codes).max() == 2 ** (bits - 1) - 1  # MinMax without clamping uses the full narrow range
        # int8 only where no 16-bit pair sum can overflow; at 8 bits a +-127 pair against code 255 does
        assert stored[f"{spec.name}/weight_quantized"].dtype == (np.uint8 if bits == 8 else np.int8)


def ln_linear_model(rng, k=16, n=8, extra_reader=None):
    """``LayerNorm -> Linear`` with gamma/beta behind Identity nodes (a deduplicating exporter) and a Shape reader."""
    nodes = [helper.make_node("Identity", ["shared_beta"], ["beta"], name="beta_identity"),
             helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="/norm1/LayerNormalization",
                              axis=-1),
             helper.make_node("Shape", ["ln"], ["ln_shape"], name="/attn/Shape"),
             helper.make_node("MatMul", ["ln", "w"], ["y0"], name="/attn/qkv/MatMul"),
             helper.make_node("Add", ["b", "y0"], ["y"], name="/attn/qkv/Add")]
    outputs = [tensor("y", ["batch", 4, n]), helper.make_tensor_value_info("ln_shape", onnx.TensorProto.INT64, [3])]
    if extra_reader == "residual":
        nodes.append(helper.make_node("Add", ["ln", "x"], ["res"], name="/residual/Add"))
        outputs.append(tensor("res", ["batch", 4, k]))
    elif extra_reader == "output":
        outputs.append(tensor("ln", ["batch", 4, k]))
    inits = [init("gamma", rng.uniform(0.5, 2, k)), init("shared_beta", rng.standard_normal(k)),
             init("w", rng.standard_normal((k, n))), init("b", rng.standard_normal(n))]
    return make_model(nodes, [tensor("x", ["batch", 4, k])], outputs, inits)


@pytest.mark.parametrize("extra_reader,folded", [(None, True), ("residual", False), ("output", False)])
def test_noise_folds_into_layernorm_beta_only_when_nothing_else_reads_it(extra_reader, folded):
    rng = np.random.default_rng(11)
    model = ln_linear_model(rng, extra_reader=extra_reader)
    layers, plan = noisy_plan(model, rng, amplitude=3.0)
    result_graph = gs.import_onnx(model)
    result = InsertNoise(layers, plan)(result_graph)
    FoldDenoisingBias(layers, plan)(result_graph)
    result_graph.cleanup().toposort()
    noisy = gs.export_onnx(result_graph)
    onnx.checker.check_model(noisy, full_check=True)
    adds = [n for n in noisy.graph.node if n.name == f"{layers.groups[0].name}/add_noise"]
    assert len(adds) == (0 if folded else 1)
    assert result.names(Role.NOISE_FOLDED) == ([f"{layers.groups[0].name}/noise_folded_bias"] if folded else [])
    assert result.names(Role.NOISE_ADD) == [n.name for n in adds]
    assert result.applied == [layers.groups[0].name] and not result.skipped
    feeds = feeds_for(model, rng)
    for want, got in zip(run(model, feeds), run(noisy, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if folded:  # beta + N, the shared original left alone
        stored = {t.name: onnx.numpy_helper.to_array(t) for t in noisy.graph.initializer}
        beta = onnx.numpy_helper.to_array(model.graph.initializer[1])
        group = layers.groups[0].name
        np.testing.assert_allclose(stored[f"{group}/noise_folded_bias"], beta + plan.groups[group].noise, atol=1e-6)


def test_decompose_gemm_is_exact_and_leaves_no_gemm():
    from nq_onnx.passes import DecomposeGemm

    rng = np.random.default_rng(12)
    model = gemm_model(rng, alpha=1.0, beta=1.0)
    graph = gs.import_onnx(model)
    assert DecomposeGemm()(graph).applied == ["/head/Gemm", "/aux/Gemm"]
    out = gs.export_onnx(graph)
    onnx.checker.check_model(out, full_check=True)
    assert "Gemm" not in {n.op_type for n in out.graph.node}
    feeds = feeds_for(model, rng)
    for want, got in zip(run(model, feeds), run(out, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    layers = find_layers(gs.import_onnx(out))
    assert [(s.name, s.op, s.bias is not None) for s in layers.layers] == \
        [("head", "MatMul", True), ("aux", "MatMul", False)]


def planned(model: onnx.ModelProto, rng: np.random.Generator):
    """The MLP in canonical form with every group and layer planned (noise on the noisy groups)."""
    layers, plan = noisy_plan(model, rng)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for spec in layers.layers:
        plan.layers[spec.name] = LayerPlan(spec.name, quant.weight_scales(weights[spec.weight], 1, 8), 8)
    return layers, plan


def test_sequential_checks_each_pass_on_the_graph_it_meets():
    """Passes run out of order stop with the pass's name and the reason; in order they rewrite the graph."""
    rng = np.random.default_rng(4)
    model = canonicalize(mlp_model(rng))
    layers, plan = planned(model, rng)
    graph = gs.import_onnx(model)
    results = Sequential((InsertNoise(layers, plan), InsertQDQ(layers, plan)))(graph)
    assert [len(r.applied) for r in results] == [2, 2]
    with pytest.raises(PassConditionError, match=r"^InsertNoise needs: group 'mlp\.fc1' is already quantized"):
        Sequential((InsertNoise(layers, plan),))(graph)  # noise after the quantizer
    with pytest.raises(PassConditionError, match=r"^InsertQDQ needs: layer 'mlp\.fc1' is not a MatMul with a constant"):
        Sequential((InsertQDQ(layers, plan),))(graph)  # the weights are already dequantized


def test_sequential_catches_a_pass_that_breaks_its_promise():
    """``ensures`` reads the rewritten graph: a pass that leaves a layer unquantized is stopped, not saved."""

    class ForgetsFc2(InsertQDQ):
        def __call__(self, graph):
            result = super().__call__(graph)
            node = next(n for n in graph.nodes if n.name == "/mlp/fc2/MatMul")
            node.inputs[0] = node.inputs[0].inputs[0].inputs[0].inputs[0].inputs[0]  # DQ(Q(x)) -> x
            return result

    rng = np.random.default_rng(5)
    model = canonicalize(mlp_model(rng))
    layers, plan = planned(model, rng)
    with pytest.raises(PassConditionError, match=r"^ForgetsFc2 promised: layer 'mlp\.fc2' reads group 'mlp\.fc2' "
                                                 "without a DequantizeLinear$"):
        Sequential((ForgetsFc2(layers, plan),))(gs.import_onnx(model))
    graph = gs.import_onnx(gemm_model(rng))

    class SkipsNothing(DecomposeGemm):
        def __call__(self, graph):
            return PassResult(graph)  # decomposes nothing and says nothing

    with pytest.raises(PassConditionError, match=r"^SkipsNothing promised: Gemm '/aux/Gemm' was neither"):
        Sequential((SkipsNothing(),))(graph)


def test_a_rewrite_of_the_float_model_must_keep_its_layers():
    """A reparameterization's ``ensures``: the layers found again on its result are the ones it was given."""
    from nq_onnx.passes.reparam_layernorm import ReparamLayerNorm

    class RenamesFc2(ReparamLayerNorm):
        def __call__(self, graph):
            next(n for n in graph.nodes if n.name == "/mlp/fc2/MatMul").name = "/head/proj/MatMul"
            return PassResult(graph)

    model = canonicalize(mlp_model(np.random.default_rng(6)))
    layers = find_layers(gs.import_onnx(model))
    assert Sequential((ReparamLayerNorm(layers, {}),))(gs.import_onnx(model))[0].applied == []  # nothing to fold
    with pytest.raises(PassConditionError, match=r"^RenamesFc2 promised: layer 'mlp\.fc2': its MatMul "
                                                 r"'/mlp/fc2/MatMul' is gone$"):
        Sequential((RenamesFc2(layers, {}),))(gs.import_onnx(model))


def test_insert_noise_promises_every_reader_reads_the_noisy_input():
    class ForgetsFc1(InsertNoise):
        def __call__(self, graph):
            result = super().__call__(graph)
            node = next(n for n in graph.nodes if n.name == "/mlp/fc1/MatMul")
            node.inputs[0] = node.inputs[0].inputs[0].inputs[0]  # Add(x, N) -> x
            return result

    rng = np.random.default_rng(7)
    model = canonicalize(mlp_model(rng))
    layers, plan = planned(model, rng)
    with pytest.raises(PassConditionError, match=r"^ForgetsFc1 promised: layer 'mlp\.fc1' does not read its group's "
                                                 r"noisy input$"):
        Sequential((ForgetsFc1(layers, plan, fold=False),))(gs.import_onnx(model))


def test_a_plan_whose_codes_break_the_pair_limit_is_refused_in_one_line():
    """An ``int8-paired`` plan holding codes whose kernel pairs pass 128 (stored GPTQ codes edited, or a plan of
    another storage relabelled) is a one-line PlanError when the model is written, not a model that saturates."""
    from nq_onnx.core.errors import PlanError

    rng = np.random.default_rng(5)
    model = mlp_model(rng, tokens=16, k=24)
    layers, plan = noisy_plan(model, rng)
    plan.config = QuantConfig(weight_dtype="int8-paired")
    for spec in layers.layers:
        codes = np.full((spec.in_features, spec.out_features), 127, np.int8)  # every pair sums to 254
        plan.layers[spec.name] = LayerPlan(spec.name, np.full(spec.out_features, 0.01, np.float32), 8,
                                           weight_codes=codes)
    before = model.SerializeToString()
    with pytest.raises(PlanError, match=r"^weight codes pair up to \d+ against the input's codes, over int16: the "
                                        r"plan's codes do not keep int8-paired storage's limit$"):
        apply_plan(model, layers, plan)
    assert model.SerializeToString() == before
