"""What a conversion did, as a value (:class:`Summary`) and as the lines ``nq-onnx convert`` prints."""

from __future__ import annotations

import dataclasses
import logging

from nq_onnx.core.version import __version__
from nq_onnx.io.cpu import blas_record, cpu_features, pinned_blas
from nq_onnx.passes.base import Skip, SkipKind


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The inputs a conversion's output error was measured on.

    ``kind``: ``held-out``, calibration-source inputs outside the calibration set (neither the statistics nor the
    searches read them); ``eval``, the evaluation data given; ``calibration``, calibration inputs the searches
    fitted on, when the source had none to spare."""

    kind: str
    images: int
    source: str
    tensors: bool = False  # ready tensors (.npy/.npz) rather than image files
    labels: str = ""  # where the labels came from ("" without labels)

    def describe(self) -> str:
        what = "inputs" if self.tensors else "images"
        if self.kind == "held-out":
            where = "calibration-file" if self.tensors else "calibration-folder"
            text = f"held out: {self.images} {where} {what} the search never saw"
        elif self.kind == "eval":
            text = f"eval data: {self.images} {what} of {self.source}"
        else:
            text = (f"calibration {what}: {self.images} {what} the search saw ({self.source} has none to spare; "
                    "--eval DATA measures on unseen ones)")
        return text + (f"; labels: {self.labels}" if self.labels else "")


@dataclasses.dataclass(frozen=True)
class Latency:
    """Batch latency of the quantized model against FP32's, timed interleaved (:mod:`nq_onnx.io.latency`)."""

    batch: int
    fp32_ms: float
    quantized_ms: float
    fp32_spread_ms: tuple[float, float]  # 10th and 90th percentiles
    quantized_spread_ms: tuple[float, float]
    rounds: int
    threads: int
    cpu: str

    @property
    def ratio(self) -> float:
        return self.quantized_ms / self.fp32_ms

    def describe(self) -> str:
        return (f"batch {self.batch}: {self.quantized_ms:.3g} ms against FP32's {self.fp32_ms:.3g} ms "
                f"({self.ratio:.2f}x the time), {self.rounds} interleaved rounds, {self.threads} threads, "
                f"on {self.cpu}")


@dataclasses.dataclass(frozen=True)
class Kernels:
    """What onnxruntime's optimized graph runs for the quantized matmuls (:func:`nq_onnx.inspect.inspect_model`),
    and why the model does not suit its target (:func:`nq_onnx.inspect.target_failures`), if it does not."""

    target: str
    integer: int  # quantized matmuls on an integer kernel
    layers: int  # quantized matmuls
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.integer == self.layers and not self.problems

    def describe(self) -> str:
        counted = f"{self.integer}/{self.layers} quantized matmuls on integer kernels"
        if self.ok:
            return f"yes ({counted}; suits target {self.target})"
        more = f"; {len(self.problems) - 1} more" if len(self.problems) > 1 else ""
        return f"no ({counted}; target {self.target}: {self.problems[0] if self.problems else ''}{more})"


@dataclasses.dataclass
class Summary:
    """What a conversion did, for the CLI and the report."""

    method: str
    layers: list[str]
    skipped: list[Skip]
    noisy_groups: int
    timings: dict[str, float]
    calib_images: int = 0
    data_skipped: int = 0
    noise_adds: int = 0  # explicit X + N Adds left at inference (the rest were folded into a preceding bias)
    noise_rejected: int = 0  # groups whose searched noise lost to EasyQuant on held-out images, and was dropped
    twin_rejected: int = 0  # twin-uniform groups (and attention maps) whose uniform fallback won on held-out images
    split_rejected: int = 0  # split attention maps whose uniform fallback won on held-out images
    asymmetric_rejected: int = 0  # asymmetric groups whose symmetric fallback won on held-out images
    reparam_groups: int = 0  # groups whose LayerNorm was reparameterized (QuantConfig.reparam)
    attention_reparams: int = 0  # scores matmuls whose Q and K were reparameterized (QuantConfig.reparam_attention)
    balanced_groups: int = 0  # GELU outputs read through a balancing Mul (QuantConfig.balance_channels)
    value_balanced: int = 0  # attention outputs balanced through the value columns (--balance-values)
    average_bits: float | None = None  # under a bits budget: the weight- and activation-count-weighted average
    bits_groups: dict[int, int] = dataclasses.field(default_factory=dict)  # under a bits budget: groups per width
    metrics: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    base_metrics: dict[str, float] | None = None  # the base method's (MinMax's) output error on the same inputs
    warnings: list[str] = dataclasses.field(default_factory=list)  # what the user should know, one line each
    # the token positions the output reads, per token count, where the searches weighted them (read_token_share)
    read_tokens: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    read_token_share: float = 0.0
    uint8_weight_layers: int = 0  # layers whose 8-bit weight codes are stored uint8 (weight_dtype auto or uint8)
    weight_dtype: str = "auto"
    evaluation: Evaluation | None = None  # where ``metrics`` were measured
    latency: Latency | None = None  # with convert(measure_latency=True)
    kernels: Kernels | None = None  # with a report


logging.getLogger("nq_onnx").addHandler(logging.NullHandler())  # a library's records reach only handlers the app sets


def verdict(summary: Summary) -> list[tuple[str, str]]:
    """What a reader wants first, as ``(what, value)`` rows (the summary's last lines and the report's first table):
    the output error against FP32 and the inputs it was measured on, top-1 of FP32 and of the quantized model with
    labels, the latency against FP32 and whether onnxruntime runs integer kernels, each where measured."""
    m = summary.metrics.get(summary.method)
    if m is None:
        rows = [("output vs FP32", "not measured")]
    else:
        agree = f", top-1 agreement {m['top1_agreement']:.1%}" if "top1_agreement" in m else ""
        rows = [("output vs FP32", f"SQNR {m['sqnr_db']:.2f} dB, MSE {m['mse']:.4g}, cosine {m['cosine']:.5f}{agree}")]
    if summary.evaluation is not None:
        rows.append((EVALUATION_ROW, summary.evaluation.describe()))
    fp32 = summary.metrics.get("fp32", {})
    if m is not None and "top1" in m and "top1" in fp32:
        change = 100 * (m["top1"] - fp32["top1"])
        rows.append(("top-1", f"FP32 {fp32['top1']:.2%}, quantized {m['top1']:.2%} ({change:+.2f} points)"))
    if summary.latency is not None:
        rows.append(("latency", summary.latency.describe()))
    if summary.kernels is not None:
        rows.append(("integer kernels", summary.kernels.describe()))
    return rows


EVALUATION_ROW = "evaluation set"


def format_summary(summary, elapsed: float, output) -> str:
    lines = [
        f"nq-onnx {summary.method}: {len(summary.layers)} layers quantized, "
        f"{summary.noisy_groups} noisy-bias groups -> {output} ({elapsed:.1f} s)"
    ]
    lines += _graph_lines(summary)
    cpu = cpu_features()
    if summary.uint8_weight_layers and summary.weight_dtype == "auto" and cpu.vnni:
        lines.append(f"  weights: {summary.uint8_weight_layers} layers stored uint8, exact on every CPU; this CPU has "
                     "VNNI, where --target x86-vnni (int8 weights) gives the same outputs faster (x86 CPUs without "
                     "VNNI saturate int8)")
    for count, what, other in ((summary.noise_rejected, "noise", "EasyQuant"),
                               (summary.twin_rejected, "twin-uniform quantizer", "the uniform quantizer"),
                               (summary.split_rejected, "split attention-map quantizer", "the uniform quantizer"),
                               (summary.asymmetric_rejected, "asymmetric quantizer", "the symmetric one")):
        if count:
            lines.append(f"  {what} dropped in {count} groups: it lost to {other} on the held-out calibration images")
    if summary.calib_images:
        extra = f", {summary.data_skipped} unreadable files skipped" if summary.data_skipped else ""
        lines.append(f"  calibration: {summary.calib_images} inputs{extra}")
    lines += [f"  skipped {skip.layer}: {skip.reason}" for skip in summary.skipped if skip.user_facing]
    lines.append(_timing_line(summary.timings))
    core = pinned_blas(cpu)
    if core:
        lines.append(f"  numpy's BLAS: OPENBLAS_CORETYPE={core} pins OpenBLAS to kernels without AVX-512 on this "
                     "AVX-512 CPU; a current OpenBLAS picks faster ones itself (the search 1.6x on ViT-S/14, README: "
                     "Compile cost)")
    if summary.metrics or summary.latency is not None or summary.kernels is not None:
        lines += [f"  {value}" if what == EVALUATION_ROW else f"  {what}: {value}" for what, value in verdict(summary)]
    lines += [f"  {warning}" for warning in summary.warnings]
    return "\n".join(lines)


def _graph_lines(summary: Summary) -> list[str]:
    """What the rewrite did beyond Q/DQ: noise, reparameterizations, widths and the tokens the searches weighted."""
    lines = []
    if summary.noisy_groups:
        lines.append(f"  noise: {summary.noisy_groups - summary.noise_adds} groups folded into a preceding bias, "
                     f"{summary.noise_adds} need an explicit Add")
    refused = [s for s in summary.skipped if s.kind == SkipKind.NOT_REPARAMETERIZED]
    if summary.reparam_groups or refused:
        reasons: dict[str, int] = {}
        for skip in refused:
            key = skip.reason.split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
        why = "; ".join(f"{n} groups: {reason}" for reason, n in reasons.items())
        lines.append(f"  reparameterized: {summary.reparam_groups} LayerNorm-fed groups" + (f" (not: {why})" if why
                                                                                            else ""))
    if summary.balanced_groups:
        plural = "s" if summary.balanced_groups != 1 else ""
        lines.append(f"  balanced: {summary.balanced_groups} GELU output{plural}, read through a Mul by per-channel "
                     "factors")
    if summary.value_balanced:
        plural = "s" if summary.value_balanced != 1 else ""
        lines.append(f"  balanced: {summary.value_balanced} attention output{plural}, through the value columns and "
                     "the projection's rows")
    kept = [s for s in summary.skipped if s.kind == SkipKind.ATTENTION_KEPT]
    if summary.attention_reparams or kept:
        why = "; ".join(f"{s.layer}: {s.reason}" for s in kept[:3]) + (f"; {len(kept) - 3} more" if len(kept) > 3
                                                                        else "")
        lines.append(f"  attention: K centred and Q/K balanced in {summary.attention_reparams} scores matmuls"
                     + (f" (not in {len(kept)}: {why})" if kept else ""))
    if summary.average_bits is not None:
        widths = ", ".join(f"{n} at {b} bits" for b, n in sorted(summary.bits_groups.items(), reverse=True))
        lines.append(f"  mixed precision: {summary.average_bits:.2f} average bits ({widths} groups)")
    if summary.read_tokens:
        where = "; ".join(f"position{'s' if len(p) > 1 else ''} {', '.join(map(str, p))} of {t}"
                          for t, p in summary.read_tokens.items())
        lines.append(f"  read tokens (what the output reads): {where}, given {summary.read_token_share:.0%} of each "
                     "search's rows")
    return lines


def _timing_line(timings: dict[str, float]) -> str:
    parts = {k: v for k, v in timings.items() if "." not in k}
    inner = ", ".join(f"{k.split('.', 1)[1][:-2].replace('_', ' ')} {v:.1f} s"
                      for k, v in timings.items() if k.count(".") == 1)  # finer parts: --profile
    timing = ", ".join(f"{k[:-2]} {v:.1f} s" + (f" ({inner})" if k == "search_s" and inner else "")
                       for k, v in parts.items())
    return f"  time: {timing}"


def profile_record(summary: Summary, wall: float, model: str, config) -> dict:
    """Where a conversion's seconds went (``convert --profile``), as JSON-ready values, all wall seconds.

    ``stages`` are the conversion's steps in the order they ran (``load``: reading the model and listing the data;
    ``calibrate``; ``search``; ``rewrite``: the graph passes; ``check``: the ONNX checker; ``evaluate``: the float
    and quantized outputs on the evaluation set; ``kernels``: the integer-kernel check of a report; ``save``;
    ``latency``; ``report``); ``wall`` is their sum and the few statements between them. ``search`` splits the
    search stage into the sequential simulation, the linear-layer search, the attention-matmul search, the rounding
    step, ... and ``other`` (the planner's own work); ``linear_search`` splits the linear-layer search into its phases
    (:attr:`nq_onnx.search.groups.GroupResult.seconds`) and ``other`` (float outputs, MinMax and final errors). With the
    CPU and numpy's BLAS kernels, which set the pace of the searches' products."""
    timings = summary.timings
    stages = {k[:-2]: v for k, v in timings.items() if "." not in k}
    search = {k.split(".", 1)[1][:-2]: v for k, v in timings.items() if k.count(".") == 1}
    phases = {k.rsplit(".", 1)[1][:-2]: v for k, v in timings.items() if k.startswith("search.linear.")}
    if "search" in stages and search:
        search["other"] = stages["search"] - sum(search.values())
    if "linear_search" in search and phases:
        phases["other"] = search["linear_search"] - sum(phases.values())
    return {"nq_onnx": __version__, "model": model, "method": summary.method, "config": config.to_dict(),
            "calib_images": summary.calib_images, "wall": wall, "stages": stages, "search": search,
            "linear_search": phases, "cpu": cpu_features().to_dict(), "blas": blas_record()}
