"""The conversion pipeline: model -> statistics -> plan -> passes -> model.

``quantize`` works on in-memory values; ``convert`` adds the file handling around it (read the input,
never touch it, write outputs atomically).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import onnx

from nq_onnx.core.version import __version__
from nq_onnx.core.atomic import write_bytes_atomic
from nq_onnx.calibration.collect import collect_stats
from nq_onnx.calibration.data import Dataset, Preprocess, load_dataset
from nq_onnx.core.config import Method, QuantConfig, Target, WeightDtype
from nq_onnx.core.errors import DataError, NQError, PlanError
from nq_onnx.core.external_data import has_external
from nq_onnx.io.cpu import one_blas_thread
from nq_onnx.io.model_io import check_output_path, convert_opset, default_opset, load_model, save_model_atomic
from nq_onnx.passes import (
    ACT_MATMUL,
    AddZeroBias,
    DecomposeGemm,
    FoldDenoisingBias,
    FoldWeightChains,
    InsertNoise,
    InsertQDQ,
    Layers,
    PassResult,
    Role,
    Skip,
    SkipKind,
    quantized_layers,
    StoreInt16Bias,
    import_graph,
)
from nq_onnx import evaluation
from nq_onnx.passes.base import Sequential, export_like
from nq_onnx.passes.find_layers import discover
from nq_onnx.core.plan import Plan, average_bits
from nq_onnx.core import technique as techniques
from nq_onnx.core.technique import Context
from nq_onnx.core.timing import timed
from nq_onnx.report.summary import Summary, profile_record
from nq_onnx.passes.store_int16_bias import ROLES as INT16_ROLES
from nq_onnx.search.planner import SearchPlanner, float_weights, minmax_plan, search_counts


@dataclasses.dataclass
class Result:
    model: onnx.ModelProto
    plan: Plan
    layers: Layers
    summary: Summary
    float_model: onnx.ModelProto | None = None  # the float model in the form the layers refer to
    baseline: Baseline | None = None  # what the base method (MinMax) is built from, for the summary's check


@dataclasses.dataclass(frozen=True)
class Baseline:
    """The canonical float model, its layers and their calibration statistics before any technique rewrote them:
    enough to build the base method's model (:func:`base_model`) that a conversion's output error is checked
    against."""

    model: onnx.ModelProto
    layers: Layers
    stats: dict


BASE_METHOD = Method.MINMAX


@one_blas_thread
def base_model(baseline: Baseline, config: QuantConfig, digest: str) -> onnx.ModelProto:
    """The model MinMax makes of the same float model with ``config``'s widths, target and activation quantizers (no
    search, no rewrite, no noise): the plainest quantization, which a searched one should not fall far behind."""
    base = dataclasses.replace(config, method=BASE_METHOD, reparam=False, reparam_attention=False,
                               balance_channels=False, techniques=())
    weights = float_weights(import_graph(baseline.model), baseline.layers)
    plan = minmax_plan(Plan(digest, base), baseline.layers, baseline.stats, weights)
    return apply_plan(baseline.model, baseline.layers, plan)[0]


def canonicalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float model in the form the passes quantize best: weights behind Identity/Transpose/Cast/DQ chains
    folded to constants, weight ``Gemm`` as ``MatMul + Add``."""
    try:  # tensor ranks let the passes prove that a rewrite keeps the channel axis
        typed = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is a help, not a requirement
        typed = model
    graph = import_graph(typed)
    Sequential((FoldWeightChains(), DecomposeGemm()))(graph)
    return export_like(graph, model)


@dataclasses.dataclass
class Rewrite:
    """What the passes of :func:`apply_plan` did: what they left alone and what they created, by role."""

    skipped: list[Skip] = dataclasses.field(default_factory=list)
    created: dict[Role, list[str]] = dataclasses.field(default_factory=dict)

    def add(self, result: PassResult) -> None:
        self.skipped += result.skipped
        for role, names in result.created.items():
            self.created.setdefault(role, []).extend(names)

    def names(self, *roles: Role) -> list[str]:
        return [name for role in roles for name in self.created.get(role, ())]


def apply_plan(model: onnx.ModelProto, layers: Layers, plan: Plan, fold_noise: bool = True,
               timings: dict[str, float] | None = None) -> tuple[onnx.ModelProto, Rewrite]:
    """Run the passes: insert_noise, insert_qdq, fold_denoising_bias, add_zero_bias (and store_int16_bias);
    check the result (its seconds as ``check_s`` in ``timings``)."""
    if plan.config.int16_bias:
        model = upgrade_opset(model, INT16_OPSET)
    graph = import_graph(model)
    values = quantized_layers(graph, layers, plan)
    rewrite = Rewrite()
    for result in Sequential((InsertNoise(layers, plan, fold_noise), InsertQDQ(layers, plan, values),
                              FoldDenoisingBias(layers, plan, values), AddZeroBias(layers)))(graph):
        rewrite.add(result)
    if plan.config.int16_bias:
        (stored,) = Sequential((StoreInt16Bias(frozenset(rewrite.names(*INT16_ROLES))),))(graph)
        rewrite.add(stored)
    graph.cleanup().toposort()
    out = export_like(graph, model)
    out.producer_name, out.producer_version = "nq-onnx", __version__
    onnx.helper.set_model_props(
        out,
        {
            **{p.key: p.value for p in model.metadata_props},
            "nq_onnx.config": json.dumps(plan.config.to_dict(), sort_keys=True),
            "nq_onnx.source_digest": plan.model_digest,
        },
    )
    if not has_external(out):  # with external data the checker needs the files: it runs when the model is saved
        with timed(timings if timings is not None else {}, "check_s"):
            try:
                onnx.checker.check_model(out, full_check=True)
            except onnx.checker.ValidationError as exc:  # a bug of ours, not the user's input
                raise RuntimeError(f"nq-onnx produced an invalid model: {exc}") from exc
    return out, rewrite


INT16_OPSET = 21  # int16 Q/DQ types


def upgrade_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The model at ``opset`` (at least)."""
    current = default_opset(model)
    if current >= opset:
        return model
    return convert_opset(model, opset, f"int16 biases need opset {opset}; the model (opset {current}) could not be "
                                       "converted")


def check_plan_fits(plan: Plan, layers: Layers) -> None:
    expected = {s.name for s in layers.layers}
    missing = expected - set(plan.layers)
    extra = set(plan.layers) - expected
    if missing or extra:
        name = sorted(missing or extra)[0]
        raise PlanError(
            f"plan does not fit the model: layer {name!r} is {'missing from' if missing else 'unknown to'} the plan"
        )
    for spec in layers.layers:
        layer = plan.layers[spec.name]
        for what, value, shape in (("weight codes", layer.weight_codes, (spec.in_features, spec.out_features)),
                                   ("bias correction", layer.bias_correction, (spec.out_features,))):
            if value is not None and value.shape != shape:
                raise PlanError(f"plan does not fit the model: layer {spec.name!r} has {what} of shape "
                                f"{list(value.shape)}, the model needs {list(shape)}")


@one_blas_thread
def quantize(
    model: onnx.ModelProto,
    digest: str,
    config: QuantConfig,
    calib: Dataset | None = None,
    plan: Plan | None = None,
    progress: Callable | None = None,
) -> Result:
    """Quantize an in-memory model with a given plan, or calibrate on ``calib`` and search one (numpy's BLAS on one
    thread: :func:`~nq_onnx.io.cpu.one_blas_thread`)."""
    timings: dict[str, float] = {}
    if plan is not None:
        plan.check_model(digest)
        config = plan.config
    model = canonicalize(model)
    layers = discover(model, config)
    reparam_skips: list[Skip] = []
    searched, baseline = plan is None, None
    if plan is None:
        if calib is None:
            raise NQError("calibration data is needed unless a plan is loaded")
        model, layers, plan, reparam_skips, baseline = _search(model, layers, Plan(digest, config), calib, progress,
                                                               timings)
    else:
        ctx = Context(model, layers, config, plan=plan, timings=timings)
        for technique in techniques.enabled(config):
            technique.replay(ctx)
        model, layers = ctx.model, ctx.layers
    check_plan_fits(plan, layers)
    start, checked = time.perf_counter(), {}
    out, rewrite = apply_plan(model, layers, plan, timings=checked)
    timings["rewrite_s"] = time.perf_counter() - start - checked.get("check_s", 0.0)
    timings.update(checked)
    summary = Summary(
        config.method.value,
        [s.name for s in layers.layers],
        [Skip(n, r, SkipKind.EXCLUDED) for n, r in layers.excluded] + reparam_skips + rewrite.skipped,
        sum(1 for g in plan.groups.values() if g.noise is not None),
        timings,
        calib_images=len(calib) if calib is not None else 0,
        data_skipped=len(calib.skipped) if calib is not None else 0,
        noise_adds=len(rewrite.names(Role.NOISE_ADD)),
        noise_rejected=_rejected(layers, plan, "noise_rejected"),
        twin_rejected=_rejected(layers, plan, "twin_rejected"),
        split_rejected=_rejected(layers, plan, "split_rejected"),
        asymmetric_rejected=_rejected(layers, plan, "asymmetric_rejected"),
        reparam_groups=sum(1 for g in plan.groups.values() if g.reparam is not None),
        attention_reparams=sum(1 for p in plan.layers.values() if p.attention is not None),
        balanced_groups=sum(1 for g in plan.groups.values() if g.balance is not None),
        value_balanced=sum(1 for g in plan.groups.values() if g.value_balance is not None),
        average_bits=average_bits(plan.groups),
        bits_groups=dict(Counter(g.bits for g in plan.groups.values())) if config.bits_budget is not None else {},
        read_tokens=dict(layers.read_tokens) if searched and config.search.read_token_share > 0 else {},
        read_token_share=config.search.read_token_share if searched else 0.0,
        uint8_weight_layers=len(rewrite.names(Role.UINT8_WEIGHTS)),
        weight_dtype=plan.config.weight_dtype.value,
    )
    checked = baseline if config.method != BASE_METHOD and config.bits_budget is None else None
    return Result(out, plan, layers, summary, model, checked)


def _rejected(layers: Layers, plan: Plan, key: str) -> int:
    """Groups (read by linear layers) and activation matmuls whose layer metrics record ``key``: a quantizer choice
    that lost to the plainer one on held-out calibration images and was dropped."""
    groups = sum(1 for g in layers.groups if any(plan.layers[c].search.get(key) for c in g.consumers
                                                 if layers.layer(c).kind != ACT_MATMUL))
    return groups + sum(1 for s in layers.layers if s.kind == ACT_MATMUL and plan.layers[s.name].search.get(key))


def _search(model: onnx.ModelProto, layers: Layers, plan: Plan, calib: Dataset, progress: Callable | None,
            timings: dict[str, float]) -> tuple[onnx.ModelProto, Layers, Plan, list[Skip], Baseline]:
    """Calibrate, let the enabled techniques rewrite the float model (the reparameterizations), search, and let them
    record what they chose; returns the float model and layers the plan refers to, the plan, and what the techniques
    could not do, and the float model, layers and statistics before any rewrite (the base method's)."""
    config = plan.config
    ctx = Context(model, layers, config, timings=timings)
    active = techniques.enabled(config)
    extra = sorted({t for technique in active for t in technique.tensors(ctx)})  # beyond the groups' own
    with timed(timings, "calibrate_s"):
        ctx.stats = collect_stats(model, [g.tensor for g in layers.groups] + extra, calib, config.batch_size, progress)
    baseline = Baseline(model, layers, dict(ctx.stats))
    for technique in active:
        technique.rewrite(ctx)
    with timed(timings, "search_s"):
        if config.method == Method.MINMAX:
            plan = minmax_plan(plan, ctx.layers, ctx.stats, float_weights(import_graph(ctx.model), ctx.layers))
        else:
            search_data = calib.head(sum(search_counts(len(calib), config.search)))
            planner = SearchPlanner(ctx.model, ctx.layers, ctx.stats, search_data, config)
            plan = planner.run(plan, progress)
            timings.update({f"search.{k}": v for k, v in planner.timings.items()})
        ctx.plan = plan
        for technique in active:
            technique.finish(ctx)
    return ctx.model, ctx.layers, plan, ctx.skipped, baseline


def _retargeted(planned: QuantConfig, asked: QuantConfig) -> QuantConfig:
    """A loaded plan's config stored for the asked CPU target and weight container. The container does not change
    the codes, but ``int8-paired``'s pair limit does (the search chose the steps under it): a plan searched under
    it keeps it (int8 codes within the limit are exact on every target), and a plan searched without it, asked
    for ``int8-paired``, is stored ``auto`` (its unconstrained codes exact on every CPU) rather than clipped."""
    if (planned.target == Target.GPU) != (asked.target == Target.GPU):
        raise PlanError(f"the plan was searched for target {planned.target.value}; target {asked.target.value} needs "
                        "its own search (gpu activations are symmetric int8)")
    dtype = asked.weight_dtype
    if planned.weight_dtype == WeightDtype.INT8_PAIRED:
        dtype = WeightDtype.INT8_PAIRED
    elif dtype == WeightDtype.INT8_PAIRED:
        dtype = WeightDtype.AUTO
    return dataclasses.replace(planned, target=asked.target, weight_dtype=dtype)


def convert(model_path: str | Path, output_path: str | Path, calib: str | Path | None = None,
            config: QuantConfig | None = None, *, load_plan: str | Path | None = None,
            save_plan: str | Path | None = None, force: bool = False, evaluate: bool = True,
            eval_data: str | Path | None = None, eval_labels: str | Path | None = None, measure_latency: bool = False,
            command: str | None = None, preprocess: dict | None = None, progress: Callable | None = None,
            report: str | Path | None = None, report_dir: str | Path | None = None,
            external_data: bool | None = None, profile: str | Path | None = None) -> Result:
    """Quantize the ONNX model at ``model_path`` into ``output_path`` (see the README for the method).

    ``evaluate``: the output error against the float model (``summary.metrics``; the inputs in
    ``summary.evaluation``) on ``eval_data`` (images, one sub-folder per class for labels, or ``.npy``/``.npz``),
    else on calibration-source inputs the conversion does not calibrate on, else (none to spare) on calibration
    inputs, said so (:mod:`nq_onnx.evaluation`). ``eval_labels`` (one class index per line, ``.npy`` or ``.npz``)
    adds top-1 of FP32 and of the quantized model; ``measure_latency`` times a batch of both interleaved
    (``summary.latency``); ``command``, the command line, is shown in the report. ``profile`` writes where the
    seconds went (:func:`nq_onnx.report.summary.profile_record`) as JSON. ``external_data`` writes the large tensors
    to a data file beside the output (``None``: when the input had external data or the output is over 2 GiB).
    ``preprocess`` overrides fields of the image preparation the model records (``input_size``, ``mean``, ``std``,
    ``interpolation``, ``crop_pct``), for calibration and evaluation images alike.

    With ``load_plan`` the plan's settings are used, except ``config.target`` and ``config.weight_dtype`` (how
    weight codes are stored) among the CPU targets; a plan searched under ``int8-paired`` keeps it, and one searched
    without it is stored ``auto`` where ``int8-paired`` is asked (:func:`_retargeted`); a plan searched for ``gpu``
    (symmetric int8 activations) and one searched for a CPU are not interchangeable.
    """
    begin = time.perf_counter()
    inputs = tuple(p for p in (model_path, calib, load_plan, eval_data, eval_labels) if p is not None)
    output_path = check_output_path(output_path, force=force, inputs=inputs)
    for extra in (save_plan, report, profile):
        if extra is not None:
            check_output_path(extra, force=force, inputs=inputs)
    model, digest = load_model(model_path)
    plan, config = _loaded_plan(load_plan, digest, config or QuantConfig())
    if calib is None and plan is None:
        raise NQError("convert needs --calib DATA (or --load-plan PLAN)")
    pre = _preprocess(model, preprocess)
    dataset = None if calib is None else load_dataset(calib, model, limit=config.calib_size, seed=config.seed,
                                                     preprocess=pre)
    judged = evaluation.judged_inputs(model, config, calib, dataset, evaluate, eval_data, eval_labels, pre,
                                      measure_latency)
    loaded = time.perf_counter() - begin
    result = quantize(model, digest, config, dataset, plan, progress)
    result.summary.timings = {"load_s": loaded} | result.summary.timings  # the stages in the order they ran
    base = None
    if evaluate and judged is not None and result.baseline is not None:
        with timed(result.summary.timings, "base_s"):
            base = base_model(result.baseline, result.plan.config, digest)
    evaluation.judge(model, result.model, result.summary, judged if evaluate else None, config, progress,
                     kernels=report is not None, base=base)
    _write(result, model_path, output_path, save_plan, external_data, judged if measure_latency else None)
    if report is not None:
        from nq_onnx.report import build_report

        with timed(result.summary.timings, "report_s"):
            build_report(result, dataset, Path(model_path).name, report, report_dir, command=command)
    if profile is not None:
        record = profile_record(result.summary, time.perf_counter() - begin, Path(model_path).name, config)
        write_bytes_atomic(profile, (json.dumps(record, indent=1) + "\n").encode())
    return result


def _write(result: Result, model_path: str | Path, output_path: Path, save_plan: str | Path | None,
           external_data: bool | None, timed_on: evaluation.EvalInputs | None) -> None:
    """Save the model (and the plan); with ``timed_on``, time the saved model against the float one on it."""
    with timed(result.summary.timings, "save_s"):
        save_model_atomic(result.model, output_path, external=external_data)
        if save_plan is not None:
            result.plan.save(save_plan)
    if timed_on is not None:
        with timed(result.summary.timings, "latency_s"):
            result.summary.latency = evaluation.measure_latency(Path(model_path), output_path, timed_on.dataset)


def _loaded_plan(load_plan: str | Path | None, digest: str, config: QuantConfig) -> tuple[Plan | None, QuantConfig]:
    """The plan at ``load_plan`` (checked against the model) and the config the conversion runs with."""
    if load_plan is None:
        return None, config
    plan = Plan.load(load_plan)
    plan.check_model(digest)
    plan.config = _retargeted(plan.config, config)
    return plan, plan.config


def _preprocess(model: onnx.ModelProto, overrides: dict | None) -> Preprocess | None:
    """The image preparation the model records with ``overrides`` applied (``None``: as recorded)."""
    if overrides and any(v is not None for v in overrides.values()):
        return Preprocess.from_model(model, **overrides)
    return None


def report(
    model_path: str | Path,
    plan_path: str | Path,
    output: str | Path,
    *,
    data: str | Path | None = None,
    report_dir: str | Path | None = None,
    force: bool = False,
    eval_labels: str | Path | None = None,
    measure_latency: bool = False,
    command: str | None = None,
) -> Result:
    """The HTML report of a saved plan applied to its model; ``data`` (all of it) adds histograms, the output error
    and, with labels (``eval_labels``, class sub-folders or an ``.npz``'s ``labels``), top-1; ``measure_latency``
    times a batch of ``data`` on both models. The verdict is a conversion's: error, top-1, latency, kernels."""
    from nq_onnx.report import build_report

    inputs = tuple(p for p in (model_path, plan_path, data, eval_labels) if p is not None)
    output = check_output_path(output, force=force, inputs=inputs)
    model, digest = load_model(model_path)
    plan = Plan.load(plan_path)
    plan.check_model(digest)
    if eval_labels is not None and data is None:
        raise DataError("--eval-labels needs --data DATA: the images or tensors the labels belong to")
    if measure_latency and data is None:
        raise DataError("--latency needs inputs to time: --data DATA")
    config = plan.config
    judged = None if data is None else evaluation.given_inputs(model, config, data, eval_labels, None)
    result = quantize(model, digest, config, plan=plan)
    evaluation.judge(model, result.model, result.summary, judged, config, kernels=True)
    if measure_latency:
        result.summary.latency = evaluation.measure_latency(Path(model_path), result.model, judged.dataset)
    build_report(result, judged.dataset if judged is not None else None, Path(model_path).name, output, report_dir,
                 command=command)
    return result
