"""Markdown tables from benchmark results files, and the README sections that show them.

python benchmarks/table.py --readme                               # rewrite every generated README section
python benchmarks/table.py benchmarks/results/full.json           # print one file's table
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BEGIN, END = "<!-- benchmark:begin -->", "<!-- benchmark:end -->"
RESULTS = Path(__file__).resolve().parent / "results"


def cpu_line(results: dict) -> str:
    """The CPU a results file was measured on, as its header says it (files from before it was recorded say so)."""
    cpu = results.get("cpu") or results.get("machine", {}).get("cpu")
    if not cpu:
        return ("CPU: features not recorded (measured before nq-onnx recorded them, on an x86 machine with VNNI, "
                "where int8 weights did not saturate).")
    flags = " ".join(cpu["flags"]) or "none found"
    return f"CPU: {cpu['model'] or 'unknown model'}, {cpu['kind']} (flags: {flags})."
ORDER = [
    "fp32",
    "ort_all_w8a8",
    "ort_linear_w8a8",
    "minmax_w8a8",
    "easyquant_w8a8",
    "noisyquant_w8a8",
    "minmax_w6a6",
    "easyquant_w6a6",
    "noisyquant_w6a6",
]


def markdown(results: dict, source) -> str:
    m = results["models"]
    s = results["settings"]
    lat = results.get("latency", {})
    lines = [
        f"Model: DINOv2-style ViT-S/14 + CIFAR-10 linear head (`../shared/models`), exported with `nq-onnx "
        f"export`. Calibration: {s['calib_size']} ImageNet samples (seed {s['seed']}); top-1 on "
        f"{s['cifar_per_class'] * 10} CIFAR-10 test images; output error against FP32 on "
        f"{s['imagenet_eval']} held-out ImageNet samples. Latency: onnxruntime {results['machine']['onnxruntime']}"
        f" CPU EP, 2 threads, {results['machine']['cpus']} cores, interleaved runs. Source: `{source}`.",
        "",
        cpu_line(results),
        "",
        "| model | top-1 % | logits SQNR dB (CIFAR) | ImageNet output MSE | vs EasyQuant same bits | "
        "batch 1 ms | batch 8 ms | x FP32 throughput (b8) | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ORDER:
        if name not in m:
            continue
        e = m[name]
        bits = e["bits"]
        eq = m.get(f"easyquant_w{bits}a{bits}")
        ratio = (
            f"{e['imagenet_heldout']['mse'] / eq['imagenet_heldout']['mse']:.3f}x"
            if eq and name != "fp32" and e["kind"].startswith("nq-onnx")
            else "-"
        )
        b1 = lat.get("batch1", {}).get(name)
        b8 = lat.get("batch8", {}).get(name)
        cells = [
            name,
            f"{100 * e['cifar']['top1']:.2f}",
            "-" if name == "fp32" else f"{e['cifar']['sqnr_db']:.2f}",
            f"{e['imagenet_heldout']['mse']:.5f}",
            ratio,
            f"{b1['median_ms']:.1f}" if b1 else "-",
            f"{b8['median_ms']:.1f}" if b8 else "-",
            f"{b8['throughput_ratio_to_fp32']:.2f}" if b8 else "-",
            f"{e['compile_s']:.0f}" if "compile_s" in e else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = results.get("noisyquant_w6a6_seeds")
    if seeds and len(seeds["seeds"]) > 1:
        lines += [
            "",
            f"NoisyQuant W6A6 over noise seeds {seeds['seeds']}: top-1 {100 * seeds['top1_mean']:.2f} "
            f"± {100 * seeds['top1_std']:.2f} %, ImageNet output MSE {seeds['imagenet_mse_mean']:.5f} "
            f"± {seeds['imagenet_mse_std']:.5f}.",
        ]
    compile_ = results.get("compile")
    if compile_:
        lines += ["", "| compile cost | calibration images | wall s | peak RSS MB |", "|---|---|---|---|"]
        for label, entry in compile_.items():
            for row in entry["nq_onnx"]:
                lines.append(
                    f"| nq-onnx convert {label} | {row['calib_images']} | {row['seconds']:.0f} | "
                    f"{row['peak_rss_mb']:.0f} |"
                )
            lines.append(
                f"| onnxruntime quantize_static {label} | {entry['onnxruntime_calib_images']} | "
                f"{entry['onnxruntime_quantize_static_s']:.0f} | - |"
            )
        real = compile_.get("vit_s14_dinov2_cifar10", {}).get("nq_onnx", [])
        at128 = next((r for r in real if r["calib_images"] == 128), None)
        if at128:
            fast, small = at128["seconds"] < 120, at128["peak_rss_mb"] < 3000
            lines += ["", f"Compile targets (ViT-S/14, 128 images): {at128['seconds']:.0f} s "
                          f"({'met' if fast else '**missed**'}: < 120 s), peak {at128['peak_rss_mb']:.0f} MB "
                          f"({'met' if small else '**missed**'}: < 3,000 MB); 1000 images cost "
                          f"{real[-1]['seconds'] / at128['seconds']:.2f}x the 128-image time (linear would be "
                          f"{real[-1]['calib_images'] / 128:.1f}x)."]
    t = results.get("targets", {})
    if t:
        lines += [
            "",
            "Targets: "
            + ", ".join(f"{k} {'met' if v else '**missed**'}" for k, v in t["met"].items())
            + f"; integer weight matmuls {t['integer_weight_matmuls']}.",
        ]
    return "\n".join(lines)


CPU_ORDER = ["easyquant_w8a8", "easyquant_w8a8_int8", "noisyquant_w8a8", "noisyquant_w8a8_int8", "ort_linear_w8a8",
             "ort_linear_w8a8_u8u8"]


def cpu_markdown(results: dict, source) -> str:
    """The table of ``benchmarks/cpu_exact.py``: the same plans stored int8 and with the default, on one CPU."""
    m, s, lat = results["models"], results["settings"], results["latency"]
    lines = [
        f"{cpu_line(results)} onnxruntime {results['machine']['onnxruntime']}, 2 threads. Calibration "
        f"{s['calib_size']} ImageNet samples; top-1 on {s['cifar_images']} CIFAR-10 test images, output MSE on "
        f"{s['imagenet_eval']} held-out ImageNet samples; kernel SQNR: the worst quantized matmul's integer "
        f"kernel against its QDQ graph evaluated op by op in float, each layer cut out and fed the activations it "
        f"sees on {s['kernel_check_images']} held-out images. Source: `{source}`.",
        "",
        "| model | weights | top-1 % | ImageNet output MSE | kernel SQNR dB, worst layer | layers below 60 dB | "
        "layers that can overflow | batch 1 ms | batch 8 ms |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| fp32 | - | {100 * m['fp32']['cifar']['top1']:.2f} | 0 | - | - | - | "
        f"{lat['batch1']['fp32']['median_ms']:.1f} | {lat['batch8']['fp32']['median_ms']:.1f} |",
    ]
    for name in CPU_ORDER:
        e = m[name]
        k = e["kernels"]
        dtypes = ", ".join(f"{n} {t}" for t, n in sorted(k["weight_dtypes"].items()))
        b1, b8 = lat["batch1"].get(name), lat["batch8"].get(name)
        lines.append(
            f"| {name} | {e['weight_dtype']} ({dtypes}) | {100 * e['cifar']['top1']:.2f} | "
            f"{e['imagenet_heldout']['mse']:.5f} | {e['kernel_fidelity']['worst_db']:.1f} | "
            f"{e['kernel_fidelity']['below_60db']}/{e['kernel_fidelity']['layers']} | "
            f"{k['can_overflow_without_vnni']}/{k['weight_layers']} | "
            f"{b1['median_ms']:.1f} | {b8['median_ms']:.1f} |"
        )
    return "\n".join(lines)


CPU_BEGIN, CPU_END = "<!-- cpu-exact:begin -->", "<!-- cpu-exact:end -->"


def _replace_block(text: str, begin: str, end: str, body: str) -> str:
    block = f"{begin}\n{body}\n{end}"
    if begin not in text:
        raise SystemExit(f"README has no {begin} marker")
    head, rest = text.split(begin, 1)
    return head + block + rest.split(end, 1)[1]


def update_readme(readme: Path) -> None:
    """Every generated section: the main table from ``full.json``, one CPU table per ``cpu_exact_*.json``."""
    root = readme.parent.resolve()
    text = readme.read_text()
    full = RESULTS / "full.json"
    text = _replace_block(text, BEGIN, END, markdown(json.loads(full.read_text()), full.resolve().relative_to(root)))
    tables = [cpu_markdown(json.loads(p.read_text()), p.resolve().relative_to(root))
              for p in sorted(RESULTS.glob("cpu_exact_*.json")) if not p.stem.endswith("_quick")]
    if tables:
        text = _replace_block(text, CPU_BEGIN, CPU_END, "\n\n".join(tables))
    readme.write_text(text)


if __name__ == "__main__":
    if "--readme" in sys.argv:
        update_readme(Path(__file__).resolve().parent.parent / "README.md")
    else:
        path = Path(sys.argv[1])
        data = json.loads(path.read_text())
        print(cpu_markdown(data, path) if path.stem.startswith("cpu_exact") else markdown(data, path))
