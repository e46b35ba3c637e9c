"""Markdown tables from a benchmark results file, and the README section that shows the latest one.

python benchmarks/table.py benchmarks/results/full.json --readme   # rewrite the README's results section
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BEGIN, END = "<!-- benchmark:begin -->", "<!-- benchmark:end -->"
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


def update_readme(results_path: Path, readme: Path) -> None:
    results = json.loads(results_path.read_text())
    text = readme.read_text()
    root = readme.parent
    block = f"{BEGIN}\n{markdown(results, results_path.resolve().relative_to(root.resolve()))}\n{END}"
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text += f"\n## Benchmark\n\n{block}\n"
    readme.write_text(text)


if __name__ == "__main__":
    path = Path(sys.argv[1])
    if "--readme" in sys.argv:
        update_readme(path, Path(__file__).resolve().parent.parent / "README.md")
    else:
        print(markdown(json.loads(path.read_text()), path))
