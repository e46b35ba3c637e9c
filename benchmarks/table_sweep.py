"""A sweep's results file (``nq-onnx sweep``: ``<out>/results.jsonl``) as a study table: one row per configuration,
the mean of its calibration seeds and their spread.

    python benchmarks/table_sweep.py benchmarks/results/sweep_methods/results.jsonl

A row's top-1 is the mean over the seeds that succeeded and its spread the largest minus the smallest; latency is
the median batch time's ratio to FP32 timed interleaved in the same run (``nq-onnx sweep`` times every model after
the trials, alone). The footnote names the CPU and versions the trials ran on, from the trial records.
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nq_onnx.sweep.results import ResultsFile  # noqa: E402

SHOWN_FIRST = ("w_bits", "a_bits", "method")  # the row label's leading options, in this order
ORDER = ("reparam", "reparam_attention", "weight_rounding", "bias_correction")  # then the rest by name


def read_results(path: Path) -> tuple[dict, list[dict], dict[str, dict]]:
    """The sweep's header, its succeeded trials (the last record of each trial) and each trial's latency line (the
    last one: the timing of the latest latency phase, as the sweep's own report reads it)."""
    results = ResultsFile(Path(path))
    return results.header or {}, [t for t in results.trials.values() if t["status"] == "ok"], results.latency


def varied(trials: list[dict]) -> list[str]:
    """The options (but the seed) whose values differ between trials, in a stable order."""
    values: dict[str, set] = defaultdict(set)
    for trial in trials:
        for key, value in trial["options"].items():
            values[key].add(json.dumps(value))
    keys = {k for k, v in values.items() if len(v) > 1 or any(k not in t["options"] for t in trials)}
    return sorted(keys - {"seed", *SHOWN_FIRST}, key=lambda k: (ORDER.index(k) if k in ORDER else len(ORDER), k))


def usual(trials: list[dict], keys: list[str]) -> dict[str, object]:
    """Each option's most common value among the trials (the first seen on a tie)."""
    counts: dict[str, Counter] = {key: Counter(json.dumps(t["options"].get(key)) for t in trials) for key in keys}
    return {key: json.loads(count.most_common(1)[0][0]) for key, count in counts.items()}


def row_label(options: dict, shown: list[str], common: dict[str, object]) -> str:
    """``W6A6 noisyquant + reparam + weight_rounding gptq``: bit widths (none under a bits budget) and method first,
    then each varied option that is on (a flag by its name) or, for another kind of value, differs from the most
    common one (``name value``)."""
    widths = "" if options.get("bits_budget") else f"W{options.get('w_bits', '?')}A{options.get('a_bits', '?')} "
    head = f"{widths}{options.get('method', '')}".strip()  # a budget's widths are its own choice per group
    rest = []
    for key in shown:
        value = options.get(key)
        if value is True:
            rest.append(key.replace("_", " "))
        elif key == "weight_rounding" and value != common.get(key):
            rest.append(str(value))  # gptq, gptq-act
        elif value not in (False, None) and value != common.get(key):
            rest.append(f"{key.replace('_', ' ')} {value}")
    return " + ".join([head, *rest])


def flags_label(options: dict) -> str:
    """A configuration as the ``nq-onnx convert`` flags that set it (``default`` where it sets none)."""
    from nq_onnx.sweep.report import config_flags
    from nq_onnx.sweep.spec import make_config

    flags = config_flags(make_config({k: v for k, v in options.items() if k != "seed"}, 0))
    if flags is None:
        return ", ".join(f"{k} {v}" for k, v in options.items() if k != "seed")
    return f"`{' '.join(flags)}`" if flags else "**default** (`nq-onnx convert` with no options)"


def _bits(trial: dict) -> float | None:
    """A trial's average bits: its budget's measured average, or the uniform width where weights and activations
    share it."""
    config = trial.get("config") or {}
    average = (trial.get("convert") or {}).get("average_bits")
    if average is not None:
        return average
    return config.get("w_bits") if config.get("w_bits") == config.get("a_bits") else None


def seed_rows(trials: list[dict], latency: dict[str, dict], flags: bool = False) -> dict[str, dict]:
    """Per configuration (the options without the seed, labelled by its varied options or, with ``flags``, by its
    ``convert`` flags): each seed's top-1 (%), output MSE, latency ratio, average bits and weight and activation
    widths."""
    rows: dict[str, dict] = defaultdict(dict)
    shown = varied(trials)
    common = usual(trials, shown)
    for trial in trials:
        metrics = trial["metrics"]
        ratio = latency.get(trial["trial"], {}).get("ratio_to_fp32")
        widths = {k: trial["config"][k] for k in ("w_bits", "a_bits") if k in (trial.get("config") or {})}
        label = flags_label(trial["options"]) if flags else row_label(widths | trial["options"], shown, common)
        rows[label][trial["seed"]] = {"top1": metrics.get("top1"), "mse": metrics.get("mse"), "ratio": ratio,
                                      "bits": _bits(trial), "agreement": metrics.get("agreement"),
                                      "widths": (widths.get("w_bits"), widths.get("a_bits"))}
    return rows


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _cell(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def seeds_markdown(path: Path, shown_as: Path | None = None, flags: bool = False) -> str:
    """The study table: FP32 first, then every configuration by its mean top-1, best first (an average-bits column
    where a trial has a bit budget; each seed's top-1 where configurations are labelled by their ``flags``);
    ``shown_as``: the results file's path as the footnote names it."""
    header, trials, latency = read_results(path)
    fp32 = header.get("fp32", {})
    rows = seed_rows(trials, latency, flags)
    seeds = sorted({seed for row in rows.values() for seed in row})
    bits = any((t.get("convert") or {}).get("average_bits") is not None for t in trials)
    extra = (["average bits"] if bits else []) + ([f"seed {s}" for s in seeds] if flags else [])
    agrees = ["agrees with FP32 % (mean)"] if flags else []
    titles = ["configuration", "seeds", *extra, "top-1 % (mean)", "spread", *agrees, "held-out output MSE (mean)",
              "batch time vs FP32"]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles),
             "| " + " | ".join(["FP32", "", *[""] * len(extra), _cell(fp32.get("top1"), ".2f"), "",
                                *["100.00"] * len(agrees), "0", "1.00x"]) + " |"]
    summary = sorted(((_mean([s["top1"] for s in row.values()]), label) for label, row in rows.items()),
                     key=lambda r: (-(r[0] or 0.0), r[1]))
    for top1, label in summary:
        row = rows[label]
        each = [s["top1"] for s in row.values() if s["top1"] is not None]
        ratio = _mean([s["ratio"] for s in row.values()])
        cells = [label, str(len(row))] + ([_cell(_mean([s["bits"] for s in row.values()]), ".2f")] if bits else [])
        cells += [_cell(row.get(s, {}).get("top1"), ".2f") for s in seeds] if flags else []
        cells += [_cell(top1, ".2f"), _cell(max(each) - min(each) if len(each) > 1 else None, ".2f")]
        cells += [_cell(_mean([s["agreement"] for s in row.values()]), ".2f")] if flags else []
        cells += [_cell(_mean([s["mse"] for s in row.values()]), ".4g"), f"{_cell(ratio, '.2f')}{'x' if ratio else ''}"]
        lines.append("| " + " | ".join(cells) + " |")
    return ("\n".join(lines) + "\n\n" + measured(header, latency) + " " + footnote(shown_as or path, trials)
            + bytes_line(Path(path)))


def default_line(path: Path, shown_as: Path) -> str:
    """One sentence for the README: the default's mean top-1 over the sweep's seeds against FP32's on the same
    images, each seed's, the spread and the mean held-out MSE, with the CPU and the source."""
    header, trials, latency = read_results(path)
    row = seed_rows(trials, latency, flags=True).get(flags_label({}))
    if not row:
        raise SystemExit(f"{shown_as}: no trial of the default")
    top1 = [row[s]["top1"] for s in sorted(row)]
    fp32, ratio = header["fp32"]["top1"], _mean([s["ratio"] for s in row.values()])
    timing = f", batch-8 throughput {1 / ratio:.2f}x FP32's in the same run" if ratio else ""
    return (f"The default over {len(top1)} calibration seeds (one sweep, "
            f"`benchmarks/sweeps/{Path(header.get('file', '')).name}`): "
            f"{np.mean(top1):.2f} % mean top-1 against FP32's {fp32:.2f} % on the same CIFAR-10 test images "
            f"({_evaluated(header)}; {np.mean(top1) - fp32:+.2f}, by seed "
            f"{', '.join(f'{t:.2f}' for t in top1)}, spread {max(top1) - min(top1):.2f}), held-out output MSE "
            f"{_mean([s['mse'] for s in row.values()]):.4f}{timing}. {footnote(shown_as, trials)}")


def _evaluated(header: dict) -> str:
    """Which labelled images the sweep evaluates, from its identity."""
    identity = header.get("identity", {})
    if identity.get("per_class"):
        return f"the first {identity['per_class']} labelled images of every class"
    return f"a seeded choice of {identity['limit']} labelled images" if identity.get("limit") else "all labelled images"


def measured(header: dict, latency: dict[str, dict]) -> str:
    """How the figures were taken: the evaluation sets' sizes (from the sweep's identity) and the timing."""
    text = (f"Top-1 on {_evaluated(header)}, output MSE against FP32 on the held-out "
            "images; each configuration's mean over its seeds, spread: the largest minus the smallest seed's top-1.")
    if latency:
        entry = next(iter(latency.values()))
        text += (f" Latency: batch {entry.get('batch')}, median of {entry.get('runs')} runs per model, each model "
                 f"timed alone after the trials, interleaved with FP32, onnxruntime CPU EP, {entry.get('threads')} "
                 "threads; the column is the mean over the seeds.")
    return text


def bytes_line(path: Path) -> str:
    """What ``benchmarks/sweep_bytes.py`` found beside the results file: the trials converted again alone."""
    check = path.with_name("bytes_check.json")
    if not check.exists():
        return ""
    data = json.loads(check.read_text())
    rows = [r for r in data["trials"].values() if "error" not in r]  # a failure checks nothing
    same = sum(r["match"] for r in rows)
    machines = sorted({_checked_on(r.get("machine", data["machine"])) for r in rows})
    pinned = rows and all("=" in r["command"].split()[0] for r in rows)  # the trial's BLAS settings set before it
    threads = (data["machine"].get("blas") or {}).get("num_threads")
    return (f" Converted again alone, each in a fresh process by the `nq-onnx convert` command line the sweep gives "
            f"for it{' with the OpenBLAS variables its trial ran under' if pinned else ''} "
            f"(`benchmarks/sweep_bytes.py`{f', numpy set to {threads} BLAS threads' if threads else ''}): "
            f"{same} of {len(rows)} trials gave the same model bytes, on {'; '.join(machines)}.")


def _checked_on(machine: dict) -> str:
    """A machine a byte check ran on: its CPU's model, kind and flags, and numpy's BLAS kernels."""
    cpu, blas = machine.get("cpu") or {}, machine.get("blas") or {}
    return (f"{cpu.get('model') or 'unknown model'}, {cpu.get('kind')} (flags: {' '.join(cpu.get('flags', []))}) "
            f"with OpenBLAS {blas.get('architecture')} kernels")


def footnote(path: Path, trials: list[dict]) -> str:
    """Where the figures come from: the results file, the trials' CPUs, BLAS kernels, versions and peak memory."""
    workers = [t.get("worker") or {} for t in trials]
    cpus = sorted({f"{w['cpu'].get('model') or 'unknown model'}, {w['cpu'].get('kind')}" for w in workers
                   if w.get("cpu")})
    blas = sorted({f"{w['blas'].get('architecture')}" for w in workers if w.get("blas")})
    versions = sorted({w.get("versions", {}).get("nq_onnx", "") for w in workers} - {""})
    peak = max((w.get("peak_rss_mb") or 0 for w in workers), default=0)
    return (f"From `{Path(path).as_posix()}` ({len(trials)} trials). CPU: {'; '.join(cpus) or 'not recorded'}; "
            f"numpy's BLAS kernels: {', '.join(blas) or 'not recorded'}; nq-onnx {', '.join(versions) or '?'}; "
            f"peak worker memory {peak:.0f} MB.")


def configurations(trials: list[dict], latency: dict[str, dict], flags: bool = True) -> list[dict]:
    """One point per configuration of a sweep's trials (:func:`read_results`), the widest activations first, the
    default first among them, then by mean top-1: its label, weight and activation widths, average bits, the mean,
    lowest and highest top-1 over its seeds, the mean output MSE and batch-time ratio to FP32."""
    points = []
    for label, row in seed_rows(trials, latency, flags).items():
        seeds = list(row.values())
        top1 = [s["top1"] for s in seeds if s["top1"] is not None]
        points.append({"label": label, "bits": seeds[0]["widths"], "average_bits": _mean([s["bits"] for s in seeds]),
                       "seeds": len(row), "top1": _mean(top1), "low": min(top1, default=None),
                       "high": max(top1, default=None), "mse": _mean([s["mse"] for s in seeds]),
                       "ratio": _mean([s["ratio"] for s in seeds])})
    default = flags_label({})
    points.sort(key=lambda p: (-p["bits"][1], p["label"] != default, -(p["top1"] or 0.0), p["label"]))
    return points


def tradeoff_markdown(path: Path, shown_as: Path, chart: str) -> str:
    """The README's results: the trade-off chart and one row per configuration (mean over the seeds), numbered as
    the chart numbers them."""
    header, trials, latency = read_results(path)
    points = configurations(trials, latency)
    fp32 = header["fp32"]["top1"]
    lines = [f"![top-1 and held-out output MSE against batch-8 latency, the default marked]({chart})", "",
             "| # | bits | `nq-onnx convert` options | top-1 % | vs FP32 | spread | held-out MSE | batch-8 time | "
             "throughput |", "|---|---|---|---|---|---|---|---|---|",
             f"| | 32 | FP32 | {fp32:.2f} | | | 0 | 1.00x | 1.00x |"]
    for number, p in enumerate(points, 1):
        timing = f"{p['ratio']:.2f}x | {1 / p['ratio']:.2f}x" if p["ratio"] else " | "
        lines.append(f"| {number} | W{p['bits'][0]}A{p['bits'][1]} | {p['label']} | {p['top1']:.2f} | "
                     f"{p['top1'] - fp32:+.2f} | {p['high'] - p['low']:.2f} | {p['mse']:.4f} | {timing} |")
    fp32_ms = _mean([entry.get("fp32_ms") for entry in latency.values()])
    timing = f" FP32's batch-8 time: {fp32_ms:.0f} ms." if fp32_ms else ""
    named = (f"The model, calibration images (each seed its own choice) and held-out images are those "
             f"`benchmarks/sweeps/{Path(header.get('file', '')).name}` names. ")
    return "\n".join(lines) + "\n\n" + named + measured(header, latency) + timing + " " + footnote(shown_as, trials)


def tradeoff_chart(path: Path, out: Path) -> None:
    """Top-1 (the seeds' range as a bar) and held-out output MSE against batch-8 latency as a multiple of FP32's,
    one point per configuration numbered as :func:`tradeoff_markdown` numbers it, the default a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header, trials, latency = read_results(path)
    points = configurations(trials, latency)
    default = flags_label({})
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.2), dpi=100)
    for ax, key in zip(axes, ("top1", "mse")):
        for number, p in enumerate(points, 1):
            if p["ratio"] is None:
                continue
            star = p["label"] == default
            color = "crimson" if star else ("tab:blue" if p["bits"][1] == 8 else "tab:orange")
            error = [[p["top1"] - p["low"]], [p["high"] - p["top1"]]] if key == "top1" else None
            ax.errorbar(p["ratio"], p[key], yerr=error, fmt="*" if star else "o", markersize=11 if star else 5,
                        color=color, capsize=2, zorder=3)
            ax.annotate(str(number), (p["ratio"], p[key]), fontsize=7, xytext=(4, 2), textcoords="offset points")
        if key == "top1":
            ax.axhline(header["fp32"]["top1"], color="grey", linestyle=":")
            ax.scatter([1.0], [header["fp32"]["top1"]], color="grey", marker="s")
            ax.set_ylabel("top-1 % (mean over seeds; bar: their range)")
        else:
            ax.set_yscale("log")
            ax.set_ylabel("held-out output MSE (mean over seeds, log)")
        ax.axvline(0.5, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("batch-8 latency, x FP32 (0.5 = twice FP32's throughput)")
        ax.grid(alpha=0.3)
    axes[0].set_title("blue W8A8, orange W6A6, star the default; numbers as in the table", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, metadata={"Software": None})
    plt.close(fig)


def bits_chart(path: Path, out: Path) -> None:
    """Top-1 against average bits, one line per method and kind (uniform widths solid, bit budgets dashed), the mean
    over the seeds with their range as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header, trials, latency = read_results(path)
    points = configurations(trials, latency, flags=False)
    lines: dict[str, list[dict]] = defaultdict(list)
    for p in points:
        budget = " + bits budget" in p["label"]
        method = p["label"].split(" + bits budget")[0] if budget else p["label"].split(" ", 1)[-1]
        lines[f"{method}, {'bits budget' if budget else 'uniform'}"].append(p)
    fig, ax = plt.subplots(figsize=(10.0, 4.2), dpi=100)
    for name, members in sorted(lines.items()):
        members.sort(key=lambda p: p["average_bits"] or 0.0)
        ax.errorbar([p["average_bits"] for p in members], [p["top1"] for p in members], marker="o", capsize=2,
                    yerr=[[p["top1"] - p["low"] for p in members], [p["high"] - p["top1"] for p in members]],
                    label=name, linestyle="--" if name.endswith("budget") else "-")
    ax.axhline(header["fp32"]["top1"], color="grey", linestyle=":", label="FP32")
    ax.set_xlabel("average bits (weights and activations, count-weighted)")
    ax.set_ylabel("top-1 % (mean over seeds; bar: their range)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, metadata={"Software": None})
    plt.close(fig)


if __name__ == "__main__":
    print(seeds_markdown(Path(sys.argv[1])))
