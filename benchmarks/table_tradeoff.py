"""The accuracy-latency trade-off of every method row of one ``methods.py`` run: a table and a chart.

    python benchmarks/table_tradeoff.py results/tradeoff_vnni.json [--seeds results/tradeoff_vnni_seed1.json ...]

Prints the Markdown (the table; with ``--seeds``, the mean of every seed's top-1 and held-out MSE for the rows all
files share) and writes the chart beside the results file (``<name>.png``): top-1 and held-out output MSE against
batch-8 latency as a multiple of FP32's, timed interleaved with FP32 in the same run, the default row marked.
NoisyQuant's own cost is each row's latency against the same plan without its noise (``<row>/no-noise``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table import blas_line, cpu_line  # noqa: E402

DEFAULT_ROW = "default"  # the row converted with QuantConfig() as it is
METHODS = {"minmax": "MinMax", "easyquant": "EasyQuant", "noisyquant": "NoisyQuant", "ptq4vit": "PTQ4ViT twin-uniform",
           "noisyquant-ptq4vit": "NoisyQuant-PTQ4ViT twin-uniform"}
OPTIONS = {"asym": "asymmetric activations", "sym": "symmetric activations", "reparam": "LayerNorm reparam",
           "attn": "attention reparam", "gptq": "GPTQ", "gptq-act": "GPTQ on quantized inputs",
           "bc": "bias correction", "vnni": "target x86-vnni", "arm64": "target arm64", "gpu": "target gpu",
           "avx2": "target x86-avx2", "floatattn": "attention matmuls in float",
           "floatav": "A V in float", "split": "split attention maps", "balance": "channel balancing"}


def row_label(row: str) -> str:
    """``noisyquant+asym+reparam+w7`` -> ``NoisyQuant + asymmetric activations + LayerNorm reparam``; the bit
    widths are the table's own column."""
    if row == DEFAULT_ROW:
        return "default"
    if row == "ort-static":
        return "onnxruntime quantize_static (QDQ, per-channel MinMax, default operators)"
    parts = row.split("+")
    words = [METHODS.get(parts[0], parts[0])]
    words += [_option_label(p) for p in parts[1:] if not (p[:1] == "w" and p[1:].isdigit())]
    return " + ".join(words)


def _option_label(part: str) -> str:
    """One option of a row's name; ``search<N>`` / ``held<N>`` are the searches' sample (``--search-images``,
    ``--holdout-images``)."""
    for prefix, label in (("search", "--search-images {}"), ("held", "--holdout-images {}")):
        if part.startswith(prefix) and part[len(prefix):].isdigit():
            return f"`{label.format(part[len(prefix):])}`"
    return OPTIONS.get(part, part)


def _latency(results: dict, name: str) -> tuple[float, float] | None:
    """``(median ms, x FP32)`` of a row's batch-8 latency, or ``None`` where it was not timed."""
    lat = results.get("latency_batch8", {})
    if name not in lat:
        return None
    return lat[name]["median_ms"], lat[name]["median_ms"] / lat["fp32"]["median_ms"]


def _label(e: dict) -> str:
    return "**default** (`nq-onnx convert` with no options)" if e["row"] == DEFAULT_ROW else row_label(e["row"])


def _points(results: dict) -> list[tuple[str, dict, tuple[float, float] | None]]:
    return [(name, e, _latency(results, name)) for name, e in results["rows"].items()]


def tradeoff_table(results: dict, source: str) -> str:
    fp32 = results["fp32"]["cifar"]["top1"]
    fp32_ms = results["latency_batch8"]["fp32"]["median_ms"]
    lines = ["| bits | method | top-1 % | vs FP32 | held-out MSE | batch-8 ms | x FP32 time | throughput x FP32 | "
             "noise cost |", "|---|---|---|---|---|---|---|---|---|",
             f"| 32 | FP32 | {100 * fp32:.2f} | | 0 | {fp32_ms:.0f} | 1.00x | 1.00x | |"]
    for name, e, lat in sorted(_points(results), key=lambda p: (-p[1]["bits"], p[0])):
        top1 = e["cifar"]["top1"]
        noise = _latency(results, f"{name}/no-noise")
        cost = f"{100 * (lat[0] / noise[0] - 1):+.1f} %" if lat and noise else "-"
        timing = f"{lat[0]:.0f} | {lat[1]:.2f}x | {1 / lat[1]:.2f}x" if lat else "- | - | -"
        bits = f"W{e['w_bits']}A{e['bits']}"
        lines.append(f"| {bits} | {_label(e)} | {100 * top1:.2f} | {100 * (top1 - fp32):+.2f} | "
                     f"{e['imagenet_heldout']['mse']:.4f} | {timing} | {cost} |")
    s = results["settings"]
    lines += ["", f"Top-1 on {10 * s['cifar_per_class']} CIFAR-10 test images; held-out output MSE against FP32 on "
              f"{s['imagenet_eval']} ImageNet images disjoint from the {s['calib_size']} calibration images (seed "
              f"{s['seed']}). Batch-8 latency: median of {results['latency_batch8']['fp32']['runs']} runs per model, "
              "interleaved with FP32 in one process, onnxruntime CPU EP, 2 threads; noise cost: against the same plan "
              f"with its noise removed. {cpu_line(results)} {blas_line(results)} Source: `{source}`."]
    return "\n".join(lines)


def _every_seed(files: list, key=None) -> list[tuple[list[dict], np.ndarray]]:
    """Each row every seed's file holds, in ``key``'s order of their names (default: by name): its entries, one per
    file, and their top-1."""
    shared = sorted(set.intersection(*(set(r["rows"]) for r, _ in files)), key=key)
    entries = [[r["rows"][name] for r, _ in files] for name in shared]
    return [(e, np.array([x["cifar"]["top1"] for x in e])) for e in entries]


def seeds_table(files: list[tuple[dict, str]]) -> str:
    """The rows every file holds: each seed's top-1 / held-out MSE and their means, with the seeds' spread."""
    fp32 = files[0][0]["fp32"]["cifar"]["top1"]
    seeds = [r["settings"]["seed"] for r, _ in files]
    lines = ["| bits | method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean top-1 % | vs FP32 | spread | "
             "mean held-out MSE |", "|---" * (len(seeds) + 6) + "|"]
    for entries, top1 in _every_seed(files):
        mse = np.array([e["imagenet_heldout"]["mse"] for e in entries])
        cells = " | ".join(f"{100 * t:.2f} / {m:.4f}" for t, m in zip(top1, mse))
        lines.append(f"| W{entries[0]['w_bits']}A{entries[0]['bits']} | {_label(entries[0])} | {cells} | "
                     f"{100 * top1.mean():.2f} | {100 * (top1.mean() - fp32):+.2f} | "
                     f"{100 * (top1.max() - top1.min()):.2f} | {mse.mean():.4f} |")
    lines += ["", f"FP32 {100 * fp32:.2f} % on the same images; spread: the largest minus the smallest seed's top-1. "
              "Each seed draws its own calibration and held-out images and its own noise. Sources: "
              + ", ".join(f"`{src}`" for _, src in files) + "."]
    return "\n".join(lines)


def tradeoff_chart(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.2), dpi=100)
    fp32 = results["fp32"]["cifar"]["top1"]
    for ax, key, label in ((axes[0], "top1", "top-1 %"), (axes[1], "mse", "held-out output MSE (log)")):
        for name, e, lat in _points(results):
            if lat is None:
                continue
            y = 100 * e["cifar"]["top1"] if key == "top1" else e["imagenet_heldout"]["mse"]
            default = e["row"] == DEFAULT_ROW
            ax.scatter(lat[1], y, s=90 if default else 30, marker="*" if default else "o",
                       color="crimson" if default else ("tab:blue" if e["bits"] == 8 else "tab:orange"), zorder=3)
            bits = f"W{e['w_bits']}A{e['bits']}"
            ax.annotate(f"default ({bits})" if default else f"{bits} {row_label(e['row'])}",
                        (lat[1], y), fontsize=6, xytext=(4, 2), textcoords="offset points")
        if key == "top1":
            ax.axhline(100 * fp32, color="grey", linestyle=":")
            ax.scatter([1.0], [100 * fp32], color="grey", marker="s")
        else:
            ax.set_yscale("log")
        ax.axvline(0.5, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("batch-8 latency, x FP32 (0.5 = twice FP32's throughput)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, metadata={"Software": None})
    plt.close(fig)


DEFAULTS = ("the defaults: the `portable` target, NoisyQuant with asymmetric activations, LayerNorm "
            "reparameterization, channel balancing of the GELU outputs, GPTQ rounding and bias correction, 8-bit "
            "weight codes stored int8 within the kernel pairs' bound (`int8-paired`), `Q K^T` on integer kernels and "
            "`A V` in float; every other row names each technique it uses")


def study_markdown(files: list[tuple[dict, Path]], chart: str) -> str:
    """The study page: the chart (``chart``: its path relative to the page), the whole trade-off table of the first
    file and the seeds' table of all of them."""
    (results, source), *_ = files
    return (f"![top-1 and held-out MSE against batch-8 latency]({chart})\n\n{tradeoff_table(results, source)} "
            f"Measured with {DEFAULTS}.\n\n{seeds_table(files)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--seeds", type=Path, nargs="*", default=[])
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    tradeoff_chart(results, args.results.with_suffix(".png"))
    print(tradeoff_table(results, f"benchmarks/results/{args.results.name}"))
    if args.seeds:
        files = [(json.loads(p.read_text()), f"benchmarks/results/{p.name}") for p in (args.results, *args.seeds)]
        print()
        print(seeds_table(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
