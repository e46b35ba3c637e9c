"""What a conversion did, as a value (:class:`Summary`) and as the lines ``nq-onnx convert`` prints."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import time
from typing import Iterator

from nq_onnx._version import __version__
from nq_onnx.cpu import blas_record, cpu_features, pinned_blas
from nq_onnx.passes.base import Skip, SkipKind


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
    reparam_groups: int = 0  # groups whose LayerNorm was reparameterized (QuantConfig.reparam)
    attention_reparams: int = 0  # scores matmuls whose Q and K were reparameterized (QuantConfig.reparam_attention)
    average_bits: float | None = None  # under a bits budget: the weight- and activation-count-weighted average
    bits_groups: dict[int, int] = dataclasses.field(default_factory=dict)  # under a bits budget: groups per width
    metrics: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    # the token positions the output reads, per token count, where the searches weighted them (read_token_share)
    read_tokens: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    read_token_share: float = 0.0
    uint8_weight_layers: int = 0  # layers whose 8-bit weight codes are stored uint8 (weight_dtype auto or uint8)
    weight_dtype: str = "auto"


_DEPTH = contextvars.ContextVar("nq_onnx_timed_depth", default=0)  # timed blocks open around the current one
log = logging.getLogger("nq_onnx.stages")
logging.getLogger("nq_onnx").addHandler(logging.NullHandler())  # a library's records reach only handlers the app sets


@contextlib.contextmanager
def timed(seconds: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall seconds of the ``with`` body to ``seconds[key]`` (a conversion's timings: each stage, each part
    of the search and each phase of a group's search accumulates here), and log its start and end: at INFO for a
    stage (a block inside no other), at DEBUG for the parts and phases within one."""
    depth = _DEPTH.get()
    token = _DEPTH.set(depth + 1)
    level = logging.INFO if depth == 0 else logging.DEBUG
    name = (key[:-2] if key.endswith("_s") else key).replace("_", " ")
    log.log(level, "%s ...", name)
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        seconds[key] = seconds.get(key, 0.0) + elapsed
        _DEPTH.reset(token)
        log.log(level, "%s: %.1f s", name, elapsed)


def format_summary(summary, elapsed: float, output) -> str:
    lines = [
        f"nq-onnx {summary.method}: {len(summary.layers)} layers quantized, "
        f"{summary.noisy_groups} noisy-bias groups -> {output} ({elapsed:.1f} s)"
    ]
    if summary.noisy_groups:
        lines.append(
            f"  noise: {summary.noisy_groups - summary.noise_adds} groups folded into a preceding bias, "
            f"{summary.noise_adds} need an explicit Add"
        )
    refused = [s for s in summary.skipped if s.kind == SkipKind.NOT_REPARAMETERIZED]
    if summary.reparam_groups or refused:
        reasons: dict[str, int] = {}
        for skip in refused:
            key = skip.reason.split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
        why = "; ".join(f"{n} groups: {reason}" for reason, n in reasons.items())
        lines.append(f"  reparameterized: {summary.reparam_groups} LayerNorm-fed groups" + (f" (not: {why})" if why
                                                                                            else ""))
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
    cpu = cpu_features()
    if summary.uint8_weight_layers and summary.weight_dtype == "auto" and cpu.vnni:
        lines.append(f"  weights: {summary.uint8_weight_layers} layers stored uint8, exact on every CPU; this CPU has "
                     "VNNI, where --target x86-vnni (int8 weights) gives the same outputs faster (x86 CPUs without "
                     "VNNI saturate int8)")
    if summary.noise_rejected:
        lines.append(f"  noise dropped in {summary.noise_rejected} groups: it lost to EasyQuant on the held-out "
                     "calibration images")
    if summary.calib_images:
        extra = f", {summary.data_skipped} unreadable files skipped" if summary.data_skipped else ""
        lines.append(f"  calibration: {summary.calib_images} inputs{extra}")
    excluded = [s for s in summary.skipped if s.user_facing]
    for skip in excluded:
        lines.append(f"  skipped {skip.layer}: {skip.reason}")
    parts = {k: v for k, v in summary.timings.items() if "." not in k}
    inner = ", ".join(f"{k.split('.', 1)[1][:-2].replace('_', ' ')} {v:.1f} s"
                      for k, v in summary.timings.items() if k.count(".") == 1)  # finer parts: --profile
    timing = ", ".join(f"{k[:-2]} {v:.1f} s" + (f" ({inner})" if k == "search_s" and inner else "")
                       for k, v in parts.items())
    lines.append(f"  time: {timing}")
    core = pinned_blas(cpu)
    if core:
        lines.append(f"  numpy's BLAS: OPENBLAS_CORETYPE={core} pins OpenBLAS to kernels without AVX-512 on this "
                     "AVX-512 CPU; a current OpenBLAS picks faster ones itself (the search 1.6x on ViT-S/14, README: "
                     "Compile cost)")
    for method, m in summary.metrics.items():
        agree = f", top-1 agreement {m['top1_agreement']:.1%}" if "top1_agreement" in m else ""
        lines.append(
            f"  output vs FP32 ({method}): MSE {m['mse']:.4g}, cosine {m['cosine']:.5f}, "
            f"SQNR {m['sqnr_db']:.2f} dB{agree}"
        )
    return "\n".join(lines)


def profile_record(summary: Summary, wall: float, model: str, config) -> dict:
    """Where a conversion's seconds went (``convert --profile``), as JSON-ready values, all wall seconds.

    ``stages`` are the conversion's steps in the order they ran (``load``: reading the model and listing the data;
    ``calibrate``; ``search``; ``rewrite``: the graph passes; ``check``: the ONNX checker; ``evaluate``; ``save``;
    ``report``); ``wall`` is their sum and the few statements between them. ``search`` splits the search stage into
    the sequential simulation, the linear-layer search, the attention-matmul search, the rounding step, ... and
    ``other`` (the planner's own work); ``linear_search`` splits the linear-layer search into its phases
    (:attr:`nq_onnx.search.GroupResult.seconds`) and ``other`` (float outputs, MinMax and final errors). With the
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
