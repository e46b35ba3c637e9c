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
    """``W6A6 noisyquant + reparam + weight_rounding gptq``: bit widths and method first, then each varied option
    that is on (a flag by its name) or, for another kind of value, differs from the most common one (``name
    value``)."""
    head = f"W{options.get('w_bits', '?')}A{options.get('a_bits', '?')} {options.get('method', '')}".strip()
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
    ``convert`` flags): each seed's top-1 (%), output MSE, latency ratio and average bits."""
    rows: dict[str, dict] = defaultdict(dict)
    shown = varied(trials)
    common = usual(trials, shown)
    for trial in trials:
        metrics = trial["metrics"]
        ratio = latency.get(trial["trial"], {}).get("ratio_to_fp32")
        label = flags_label(trial["options"]) if flags else row_label(trial["options"], shown, common)
        rows[label][trial["seed"]] = {"top1": metrics.get("top1"), "mse": metrics.get("mse"), "ratio": ratio,
                                      "bits": _bits(trial), "agreement": metrics.get("agreement")}
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
    return (f" Converted again alone, each in a fresh process by the `nq-onnx convert` command line the sweep gives "
            f"for it{' with the BLAS settings its trial ran under' if pinned else ''} (`benchmarks/sweep_bytes.py`): "
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


if __name__ == "__main__":
    print(seeds_markdown(Path(sys.argv[1])))
