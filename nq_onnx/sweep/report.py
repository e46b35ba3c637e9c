"""A sweep's report: the trials as a Markdown table with their Pareto front, the same as a chart, and the command
line that reproduces a chosen trial."""

from __future__ import annotations

import dataclasses
import json
import math
import shlex

from nq_onnx.core import options
from nq_onnx.core.config import QuantConfig
from nq_onnx.core.presets import PRESETS
from nq_onnx.sweep.pick import HIGHER_IS_BETTER, pareto_front

def command_line(model: str, calib: str, output: str, config: QuantConfig, blas: dict | None = None) -> str:
    """``nq-onnx convert ...`` giving ``config``'s model, its flags generated from the options the configuration
    fields declare (:mod:`nq_onnx.core.options`), a technique's settings included; where a setting that differs from
    its default has no flag, the same conversion through the Python API. ``blas``: the BLAS a trial ran on (its
    record's ``worker.blas``), whose thread count and OpenBLAS settings the searches' float sums depend on, set
    before the command (:func:`blas_env`)."""
    env = [f"{k}={v}" for k, v in blas_env(blas).items()]
    flags = config_flags(config)
    if flags is None:
        return " ".join([*env, _python_call(model, calib, output, config)])
    return shlex.join([*env, "nq-onnx", "convert", model, "-o", output, "--calib", calib, *flags])


def blas_env(blas: dict | None) -> dict[str, str]:
    """The environment that gives numpy's BLAS the kernels of ``blas`` (a :func:`~nq_onnx.io.cpu.blas_record`):
    the OpenBLAS variables the trial ran under (``OPENBLAS_CORETYPE`` picks another core's kernels, whose sums round
    differently). The thread count is not among them: a conversion runs its searches on one BLAS thread."""
    env = {k: str(v) for k, v in sorted(((blas or {}).get("env") or {}).items())}
    env.pop("OPENBLAS_NUM_THREADS", None)
    return env


def config_flags(config: QuantConfig) -> list[str] | None:
    """The ``convert`` flags that give ``config``: those that set every field that differs from the defaults (none
    for the defaults), or ``--preset NAME`` and the fields that differ from that preset where that is shorter; ``None``
    where such a field has no flag."""
    best = _flags_over(config, QuantConfig())
    for name in PRESETS:
        over = _flags_over(config, QuantConfig.preset(name))
        if over is not None and (best is None or len(over) + 2 < len(best)):
            best = ["--preset", name, *over]
    return best


def _flags_over(config: QuantConfig, base: QuantConfig) -> list[str] | None:
    """The flags that set every field of ``config`` that differs from ``base`` (``None``: one has no flag)."""
    words: list[str] = []
    tables = [(config, base), (config.search, base.search)]
    tables += [(settings, type(settings)()) for settings in config.techniques]
    held = options.held_fields()
    for table, default in tables:
        for field in dataclasses.fields(table):
            value = getattr(table, field.name)
            if field.name in held or value == getattr(default, field.name):
                continue
            if options.OPTION not in field.metadata:
                return None
            words += _flag(options.flag_of(field), value)
    return words


def _flag(flag: str, value) -> list[str]:
    """The words that set a flag's field to ``value`` (the parser's actions: :mod:`nq_onnx.cli.options`)."""
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, tuple):
        return [w for item in value for w in (flag, str(item))]
    return [flag, str(getattr(value, "value", value))]


def _python_call(model: str, calib: str, output: str, config: QuantConfig) -> str:
    code = (f"import nq_onnx; nq_onnx.convert({model!r}, {output!r}, {calib!r}, "
            f"nq_onnx.QuantConfig.from_dict({json.dumps(config.to_dict(), sort_keys=True)}))")
    return shlex.join(["python", "-c", code])


def axes(fp32: dict[str, float], records: list[dict]) -> tuple[str, str]:
    """The front's cost (latency where measured, else size) and quality (top-1 where labelled, else output MSE)."""
    cost = "latency_ms" if all(r["metrics"].get("latency_ms") is not None for r in records) and records else "size_mb"
    quality = "top1" if "top1" in fp32 else "mse"
    return cost, quality


def front_of(records: list[dict], cost: str, quality: str) -> list[int]:
    sign = 1 if quality in HIGHER_IS_BETTER else -1
    return pareto_front([(r["metrics"][cost], sign * r["metrics"][quality]) for r in records])


def markdown_table(records: list[dict], fp32: dict[str, float], labels: list[str], chosen: dict | None) -> str:
    """Every succeeded trial, cheapest first, the front marked ``*`` and the chosen trial ``<-``; FP32 first."""
    cost, quality = axes(fp32, records)
    front = set(front_of(records, cost, quality))
    columns = [m for m in ("top1", "agreement", "mse", "sqnr_db", "latency_ms", "latency_ratio", "size_mb",
                           "convert_s") if any(r["metrics"].get(m) is not None for r in records) or m in fp32]
    lines = ["| trial | " + " | ".join(columns) + " | front |", "|---" * (len(columns) + 2) + "|",
             "| fp32 | " + " | ".join(_cell(m, fp32.get(m)) for m in columns) + " | |"]
    order = sorted(range(len(records)), key=lambda i: (records[i]["metrics"][cost], labels[i]))
    for i in order:
        mark = ("*" if i in front else "") + (" <- chosen" if chosen is records[i] else "")
        lines.append(f"| {labels[i]} | " + " | ".join(_cell(m, records[i]["metrics"].get(m)) for m in columns)
                     + f" | {mark.strip()} |")
    return "\n".join(lines) + "\n"


def _cell(metric: str, value) -> str:
    if value is None:
        return ""
    if metric in ("mse", "latency_ms", "size_mb"):
        return f"{value:.4g}"
    if metric == "sqnr_db" and math.isinf(value):
        return "inf"
    return f"{value:.3f}" if metric in ("cosine", "latency_ratio") else f"{value:.2f}"


def chart(records: list[dict], fp32: dict[str, float], chosen: dict | None) -> bytes:
    """Quality against cost for every trial, the front as a line, FP32 and the chosen trial marked (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nq_onnx.report.figures import png

    cost, quality = axes(fp32, records)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter([r["metrics"][cost] for r in records], [r["metrics"][quality] for r in records], s=18, color="0.55",
               label="trial")
    front = [records[i] for i in front_of(records, cost, quality)]
    ax.plot([r["metrics"][cost] for r in front], [r["metrics"][quality] for r in front], "-o", color="tab:blue",
            ms=5, label="Pareto front")
    if cost in fp32 and quality in fp32:
        ax.scatter([fp32[cost]], [fp32[quality]], marker="s", color="black", label="FP32")
    if chosen is not None:
        ax.scatter([chosen["metrics"][cost]], [chosen["metrics"][quality]], marker="*", s=220, color="tab:red",
                   label="chosen", zorder=5)
    ax.set_xlabel(cost)
    ax.set_ylabel(quality)
    if quality == "mse":
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return png(fig)
