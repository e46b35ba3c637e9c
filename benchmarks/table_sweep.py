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
from collections import defaultdict
from pathlib import Path

import numpy as np

SHOWN_FIRST = ("w_bits", "a_bits", "method")  # the row label's leading options, in this order


def read_results(path: Path) -> tuple[dict, list[dict], dict[str, dict]]:
    """The sweep's header, its succeeded trials (the last record of each trial) and each trial's latency line."""
    header, trials, latency = {}, {}, {}
    for line in Path(path).read_text().splitlines():
        entry = json.loads(line)
        if entry["kind"] == "sweep":
            header = entry
        elif entry["kind"] == "trial":
            trials[entry["trial"]] = entry
        elif entry["kind"] == "latency":
            latency.setdefault(entry["trial"], entry)
    return header, [t for t in trials.values() if t["status"] == "ok"], latency


def row_label(options: dict) -> str:
    """``W6A6 noisyquant reparam=True ...``: bit widths and method first, then every other option but the seed."""
    head = f"W{options.get('w_bits', '?')}A{options.get('a_bits', '?')} {options.get('method', '')}".strip()
    rest = [f"{k}={v}" for k, v in sorted(options.items()) if k not in (*SHOWN_FIRST, "seed")]
    return " ".join([head, *rest])


def seed_rows(trials: list[dict], latency: dict[str, dict]) -> dict[str, dict]:
    """Per configuration (the options without the seed): each seed's top-1, output MSE and latency ratio."""
    rows: dict[str, dict] = defaultdict(lambda: defaultdict(dict))
    for trial in trials:
        label = row_label(trial["options"])
        metrics = trial["metrics"]
        ratio = latency.get(trial["trial"], {}).get("ratio_to_fp32")
        rows[label][trial["seed"]] = {"top1": metrics.get("top1"), "mse": metrics.get("mse"), "ratio": ratio}
    return rows


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _cell(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def seeds_markdown(path: Path) -> str:
    """The study table: FP32 first, then every configuration by its mean top-1, best first."""
    header, trials, latency = read_results(path)
    fp32 = header.get("fp32", {})
    lines = ["| configuration | seeds | top-1 % (mean) | spread | held-out output MSE (mean) | batch time vs FP32 |",
             "|---|---|---|---|---|---|",
             f"| FP32 | | {_cell(100 * fp32['top1'], '.2f') if 'top1' in fp32 else ''} | | 0 | 1.00x |"]
    rows = seed_rows(trials, latency)
    summary = []
    for label, seeds in rows.items():
        top1 = [s["top1"] for s in seeds.values() if s["top1"] is not None]
        spread = 100 * (max(top1) - min(top1)) if len(top1) > 1 else None
        summary.append((_mean(top1), label, len(seeds), spread, _mean([s["mse"] for s in seeds.values()]),
                        _mean([s["ratio"] for s in seeds.values()])))
    summary.sort(key=lambda r: (-(r[0] or 0.0), r[1]))
    for top1, label, count, spread, mse, ratio in summary:
        lines.append(f"| {label} | {count} | {_cell(None if top1 is None else 100 * top1, '.2f')} | "
                     f"{_cell(spread, '.2f')} | {_cell(mse, '.4g')} | {_cell(ratio, '.2f')}{'x' if ratio else ''} |")
    return "\n".join(lines) + "\n\n" + footnote(path, trials)


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
