"""Markdown tables from benchmark results files, and the docs sections that show them.

python benchmarks/table.py --docs                                 # rewrite every generated docs section
python benchmarks/table.py benchmarks/results/full.json           # print one file's table

Every generated section names its results file, the CPU it was measured on and the settings it was measured
under (:func:`conditions_line`); ``table_docs.SECTIONS`` says which file goes into which page.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

def blas_line(results: dict) -> str:
    """The BLAS kernels numpy ran (``run.blas``), as a table footnote says them."""
    b = results.get("machine", {}).get("blas")
    if not b:
        return "numpy's BLAS kernels not recorded."
    env = ", ".join(f"`{k}={v}`" for k, v in b["env"].items()) or "no OpenBLAS variables set"
    return (f"numpy's BLAS: {b['internal_api']} {b['version']}, {b['architecture']} kernels, {b['num_threads']} "
            f"threads ({env}).")


def cpu_line(results: dict) -> str:
    """The CPU a results file was measured on, as its header says it (files from before it was recorded say so)."""
    cpu = results.get("cpu") or results.get("machine", {}).get("cpu")
    if not cpu:
        return ("CPU: features not recorded in this results file (an x86 CPU with VNNI, where int8 weights do not "
                "saturate).")
    flags = " ".join(cpu["flags"]) or "none found"
    return f"CPU: {cpu['model'] or 'unknown model'}, {cpu['kind']} (flags: {flags})."


# Results files whose searches counted every token row once: measured before the read-token weighting
# (``--read-token-share 0.5``) was nq-onnx's default.
UNIFORM_ROWS = frozenset({"full.json", "ablation_w6a6.json", "methods.json", "methods_cifar2000.json", "mixed.json",
                          "mixed_additivity.json", "cpu_exact_x86_avx2_without_vnni.json"})
# Results files measured with the paper's quantizer rather than the defaults: symmetric per-tensor activations, every
# matmul input quantized, nearest rounding, no reparameterization, balancing or bias correction, 8-bit weights stored
# uint8 where int8 could saturate (``--weight-dtype auto``). Any other file was measured under the defaults.
PAPER_QUANTIZER_FILES = UNIFORM_ROWS | frozenset({
    "bottleneck_x86_avx_512_vnni.json", "compile_cost.json", "compile_cost_vnni.json",
    "compile_cost_vnni_skylakex.json",
    "demo.json", "error_share_w6_x86_avx_512_vnni.json",
    "error_share_w6_x86_avx_512_vnni_attn.json", "gptq_float64_gram_seed1.json", "methods_read_tokens.json",
    "methods_vnni.json", "methods_vnni_seed1.json", "methods_vnni_seed2.json", "mixed_images8_vnni.json",
    "mixed_images_vnni.json", "mixed_images_vnni_seed1.json", "mixed_images_vnni_seed2.json", "mixed_vnni.json",
    "profile_vnni_haswell.json", "profile_vnni_skylakex.json", "theorem.json"})


def conditions_line(results: dict, source) -> str:
    """The settings a results file was measured under, as a table's footnote says them: the nq-onnx version, and
    for the files measured with the paper's quantizer (:data:`PAPER_QUANTIZER_FILES`) that quantizer and the searches'
    token weighting."""
    version = results.get("machine", {}).get("nq_onnx") or "0.1.0"
    name = Path(str(source)).name
    if name not in PAPER_QUANTIZER_FILES:
        return f"Settings: nq-onnx {version} and its defaults, unless the row says otherwise."
    rows = ("every token row counted once by the searches (`--read-token-share 0`)" if name in UNIFORM_ROWS
            else "the class token given half of each search's rows (`--read-token-share 0.5`)")
    return (f"Settings: nq-onnx {version} with the paper's quantizer, not the defaults: symmetric per-tensor "
            f"activations, every matmul input quantized, nearest rounding, no reparameterization, channel balancing "
            f"or bias correction, 8-bit weights stored uint8 where int8 could saturate (`--weight-dtype auto`); "
            f"{rows}; unless the row says otherwise.")


ORDER = [
    "fp32",
    "ort_all_w8a8",
    "ort_linear_w8a8",
    "ort_linear_w8a8_u8u8",
    "minmax_w8a8",
    "easyquant_w8a8",
    "noisyquant_shift_w8a8",
    "noisyquant_paper_w8a8",
    "noisyquant_w8a8",
    "noisyquant_w8a8_plain",
    "minmax_w6a6",
    "easyquant_w6a6",
    "noisyquant_shift_w6a6",
    "noisyquant_paper_w6a6",
    "noisyquant_w6a6",
]
NOISE_LABEL = {"paper": "paper's noise", "shift": "shift", "paper+shift": "noise + shift"}


def _row(name: str, e: dict, m: dict, lat: dict) -> str:
    bits = e["bits"]
    eq = m.get(f"easyquant_w{bits}a{bits}")
    ours = e["kind"].startswith("nq-onnx") and name != "fp32"
    ratio = f"{e['imagenet_heldout']['mse'] / eq['imagenet_heldout']['mse']:.3f}x" if eq and ours else "-"
    b1, b8 = lat.get("batch1", {}).get(name), lat.get("batch8", {}).get(name)
    noise = NOISE_LABEL.get(e.get("noise") or "", "-") if e["kind"] == "nq-onnx noisyquant" else "-"
    overflow = e.get("kernels", {}).get("can_overflow_without_vnni")
    cells = [
        name, noise,
        f"{100 * e['cifar']['top1']:.2f}",
        "-" if name == "fp32" else f"{e['cifar']['sqnr_db']:.2f}",
        f"{e['imagenet_heldout']['mse']:.5f}",
        ratio,
        "-" if overflow is None else f"{overflow}/{e['kernels']['weight_layers']}",
        f"{b1['median_ms']:.1f}" if b1 else "-",
        f"{b8['median_ms']:.1f}" if b8 else "-",
        f"{b8['throughput_ratio_to_fp32']:.2f}" if b8 else "-",
        f"{e['compile_s']:.0f}" if "compile_s" in e else "-",
    ]
    return "| " + " | ".join(cells) + " |"


def attribution(m: dict, bits: int) -> str | None:
    """One sentence: where NoisyQuant's gain over EasyQuant comes from at ``bits``, with the figures."""
    names = {mode: f"noisyquant{suffix}_w{bits}a{bits}" for mode, suffix in
             (("shift", "_shift"), ("paper", "_paper"), ("both", ""))}
    eq = m.get(f"easyquant_w{bits}a{bits}")
    if eq is None or any(n not in m for n in names.values()):
        return None

    def part(mode: str) -> str:
        e = m[names[mode]]
        return (f"{e['imagenet_heldout']['mse'] / eq['imagenet_heldout']['mse']:.3f}x the output MSE, "
                f"{100 * (e['cifar']['top1'] - eq['cifar']['top1']):+.2f} points of top-1")

    return (f"W{bits}A{bits}, against EasyQuant: the paper's noisy bias alone {part('paper')}; the channel shift "
            f"alone {part('shift')}; both {part('both')}.")


def layer_kinds(entry: dict) -> list[str]:
    """Per layer kind: how many layers took noise and the held-out output-MSE reduction against EasyQuant."""
    kinds: dict[str, list] = {}
    for layer in entry.get("layers", {}).values():
        if layer["kind"] == "attention":  # Q K^T and A V: no weight, so no noise (the same step as EasyQuant's)
            kinds.setdefault("attention", []).append((False, 0.0))
            continue
        if "mse_noisyquant" not in layer:
            continue
        held = "mse_noisyquant_held_out" in layer and not layer.get("noise_rejected")
        ratio = (layer["mse_noisyquant_held_out"] / layer["mse_easyquant_held_out"] if held
                 else layer["mse_noisyquant"] / layer["mse_easyquant"] if layer["mse_easyquant"] > 0 else 1.0)
        noisy = layer["noise_amplitude"] > 0 or layer["noise_shift"] > 0
        kinds.setdefault(layer["kind"], []).append((noisy, 1.0 - ratio))
    lines = []
    for kind, rows in sorted(kinds.items()):
        reductions = [r for noisy, r in rows if noisy]
        median = f"{100 * sorted(reductions)[len(reductions) // 2]:.1f} %" if reductions else "-"
        best = f"{100 * max(reductions):.1f} %" if reductions else "-"
        lines.append(f"| {kind} | {len(rows)} | {len(reductions)} | {median} | {best} |")
    return lines




def _seed_lines(results: dict) -> list[str]:
    """The spread of the noisy rows over noise seeds, where the run converted more than one."""
    seeds = results.get("seeds") or {}
    if "noisyquant_w6a6_seeds" in results:
        seeds = {"noisyquant_w6a6": results["noisyquant_w6a6_seeds"]}
    spread = [f"{name} top-1 {100 * v['top1_mean']:.2f} ± {100 * v['top1_std']:.2f} %, output MSE "
              f"{v['imagenet_mse_mean']:.5f} ± {v['imagenet_mse_std']:.5f}" for name, v in seeds.items()
              if len(v["seeds"]) > 1]
    return ["", f"Over noise seeds {next(iter(seeds.values()))['seeds']}: " + "; ".join(spread) + "."] if spread else []


def _size_lines(results: dict) -> list[str]:
    """NoisyQuant W6A6 at each calibration size the run converted."""
    m, s = results["models"], results["settings"]
    sizes = sorted((e["calib_images"], n) for n, e in m.items() if "calib_images" in e)
    if not sizes or "noisyquant_w6a6" not in m:
        return []
    sizes = sorted(sizes + [(s["calib_size"], "noisyquant_w6a6")])
    lines = ["", "| NoisyQuant W6A6, calibration images | top-1 % | ImageNet output MSE | compile s |",
             "|---|---|---|---|"]
    for size, name in sizes:
        e = m[name]
        held = "" if size + s["imagenet_eval"] <= 1000 else " (overlaps the held-out images)"
        lines.append(f"| {size} | {100 * e['cifar']['top1']:.2f} | {e['imagenet_heldout']['mse']:.5f}{held} | "
                     f"{e['compile_s']:.0f} |")
    top = [100 * m[n]["cifar"]["top1"] for _, n in sizes]
    return lines + ["", f"Top-1 spread over calibration sizes: {max(top) - min(top):.2f} points (the paper's "
                        "supplementary Table 2: within 0.5)."]


def _kind_lines(m: dict) -> list[str]:
    """Per noisy row, the per-layer-kind table of :func:`layer_kinds`."""
    lines = []
    for name in ("noisyquant_w8a8", "noisyquant_paper_w8a8", "noisyquant_w6a6", "noisyquant_paper_w6a6"):
        kinds = layer_kinds(m.get(name, {}))
        if kinds:
            lines += ["", f"Per-layer output-MSE reduction against EasyQuant, `{name}` (held-out rows where the noise "
                          "was checked on them; the paper reports up to 60 %; the attention matmuls `Q K^T` "
                          "and `A V` have no weight, so no noise):", "",
                      "| layer kind | layers | with noise | median reduction | largest reduction |",
                      "|---|---|---|---|---|", *kinds]
    return lines


def _compile_lines(results: dict) -> list[str]:
    """The compile cost curve: wall time and peak memory per calibration size, beside ``quantize_static``."""
    compile_ = results.get("compile")
    if not compile_:
        return []
    lines = ["", "| compile cost | calibration images | wall s | peak RSS MB |", "|---|---|---|---|"]
    for label, entry in compile_.items():
        lines += [f"| nq-onnx convert {label} | {row['calib_images']} | {row['seconds']:.0f} | "
                  f"{row['peak_rss_mb']:.0f} |" for row in entry["nq_onnx"]]
        lines.append(f"| onnxruntime quantize_static {label} | {entry['onnxruntime_calib_images']} | "
                     f"{entry['onnxruntime_quantize_static_s']:.0f} | - |")
    real = compile_.get("vit_s14_dinov2_cifar10", {}).get("nq_onnx", [])
    at128 = next((r for r in real if r["calib_images"] == 128), None)
    if at128:
        lines += ["", f"ViT-S/14 at 128 images: {at128['seconds']:.0f} s, peak {at128['peak_rss_mb']:.0f} MB; "
                      f"{real[-1]['calib_images']} images cost {real[-1]['seconds'] / at128['seconds']:.2f}x the "
                      f"128-image time (linear would be {real[-1]['calib_images'] / 128:.1f}x)."]
    return lines


def integer_line(m: dict) -> list[str]:
    """How many of the nq-onnx models' weight matmuls run on onnxruntime's integer kernels."""
    ours = [e for n, e in m.items() if n.startswith(("noisyquant", "easyquant")) and "kernels" in e]
    if not ours:
        return []
    integer = sum(e["kernels"]["weight_layers_integer"] for e in ours)
    total = sum(e["kernels"]["weight_layers"] for e in ours)
    return ["", f"Weight matmuls on integer kernels, over every nq-onnx model of this run: {integer}/{total}."]


def markdown(results: dict, source) -> str:
    """The side-by-side table of ``benchmarks/run.py`` (and ``--ablation``): every model's top-1, held-out error,
    kernels, latency and compile time, then what the run adds (seeds, calibration sizes, layer kinds, cost)."""
    m, s = results["models"], results["settings"]
    lat = results.get("latency", {})
    lines = [
        f"Model: DINOv2-style ViT-S/14 + CIFAR-10 linear head, exported with `nq-onnx export`. Calibration: "
        f"{s['calib_size']} ImageNet samples (seed {s['seed']}); top-1 on {s['cifar_per_class'] * 10} CIFAR-10 test "
        f"images; output error against FP32 on {s['imagenet_eval']} held-out ImageNet samples. Latency: onnxruntime "
        f"{results['machine']['onnxruntime']} CPU EP, 2 threads, {results['machine']['cpus']} cores, interleaved "
        f"runs. Source: `{source}`.",
        "", f"{cpu_line(results)} {conditions_line(results, source)}", "",
        "| model | noise | top-1 % | logits SQNR dB (CIFAR) | ImageNet output MSE | vs EasyQuant same bits | "
        "layers that can overflow without VNNI | batch 1 ms | batch 8 ms | x FP32 throughput (b8) | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(name, m[name], m, lat) for name in ORDER if name in m]
    sentences = [t for t in (attribution(m, 8), attribution(m, 6)) if t]
    if sentences:
        lines += ["", "**Where the gain comes from** (held-out ImageNet output MSE and CIFAR-10 top-1, same run): "
                  + " ".join(sentences)]
    lines += _seed_lines(results) + _size_lines(results) + _kind_lines(m) + _compile_lines(results)
    return "\n".join(lines + integer_line(m))


# the rows and same-plan pairs of a cpu_exact file that does not list its own (the paper's quantizer, two methods)
CPU_ORDER = ["easyquant_w8a8", "easyquant_w8a8_int8", "noisyquant_w8a8", "noisyquant_w8a8_int8", "ort_linear_w8a8",
             "ort_linear_w8a8_u8u8"]
CPU_SAME_PLAN = (("easyquant_w8a8", "easyquant_w8a8_int8"), ("noisyquant_w8a8", "noisyquant_w8a8_int8"))


def cpu_markdown(results: dict, source) -> str:
    """The table of ``benchmarks/cpu_exact.py``: each model's kernels against its QDQ graph on one CPU, and the
    same plans stored two ways against each other."""
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
    lines += [_cpu_row(name, m[name], lat) for name in results.get("rows", CPU_ORDER)]
    parts = []
    for exact_name, fast_name in results.get("same_plan", CPU_SAME_PLAN):
        exact, fast = m[exact_name], m[fast_name]
        slower = lat["batch8"][exact_name]["median_ms"] / lat["batch8"][fast_name]["median_ms"] - 1
        mse = exact["imagenet_heldout"]["mse"] / fast["imagenet_heldout"]["mse"] - 1
        top1 = 100 * (exact["cifar"]["top1"] - fast["cifar"]["top1"])
        parts.append(f"{exact_name} against {fast_name}: {100 * slower:+.1f} % batch-8 latency, {100 * mse:+.1f} % "
                     f"output MSE, {top1:+.2f} points of top-1")
    lines += ["", f"The same plan stored `--weight-dtype auto` (uint8 where int8 could saturate) and int8 on this "
                  f"CPU: {'; '.join(parts)}.", "", conditions_line(results, source)]
    return "\n".join(lines)


def _cpu_row(name: str, e: dict, lat: dict) -> str:
    k = e["kernels"]
    dtypes = ", ".join(f"{n} {t}" for t, n in sorted(k["weight_dtypes"].items()))
    b1, b8 = lat["batch1"].get(name), lat["batch8"].get(name)
    return (f"| {name} | {e['weight_dtype']} ({dtypes}) | {100 * e['cifar']['top1']:.2f} | "
            f"{e['imagenet_heldout']['mse']:.5f} | {e['kernel_fidelity']['worst_db']:.1f} | "
            f"{e['kernel_fidelity']['below_60db']}/{e['kernel_fidelity']['layers']} | "
            f"{k['can_overflow_without_vnni']}/{k['weight_layers']} | {b1['median_ms']:.1f} | {b8['median_ms']:.1f} |")


def demo_markdown(demo: dict, source) -> str:
    """The README's paragraph on what ``nq-onnx demo`` prints, from the ``demo.json`` it wrote."""
    m = demo["methods"]
    eq = m["easyquant"]["mse"]
    parts = ", ".join(f"{name} {v['mse']:.4f}" + (f" ({v['mse'] / eq:.2f}x EasyQuant)" if name == "noisyquant" else "")
                      for name, v in m.items())
    return (f"The demo printed (W{demo['bits']}A{demo['bits']}, output MSE against FP32 on {demo['eval_crops']} "
            f"crops of {demo['eval_photos']} photographs not used for calibration, {demo['calib_crops']} "
            f"calibration crops): {parts}; conversion times "
            + ", ".join(f"{name} {v['seconds']:.0f} s" for name, v in m.items())
            + f". {cpu_line(demo)} {conditions_line(demo, source)} Source: `{source}` (`python benchmarks/demo.py`).")


ROW_LABEL = {"easyquant": "EasyQuant", "noisyquant": "NoisyQuant", "easyquant+reparam": "EasyQuant + reparam",
             "noisyquant+reparam": "NoisyQuant + reparam", "easyquant+gptq": "EasyQuant + GPTQ",
             "easyquant+bc": "EasyQuant + bias correction", "all": "NoisyQuant + reparam + GPTQ + bias correction",
             "ptq4vit": "PTQ4ViT (twin-uniform)", "noisyquant-ptq4vit": "NoisyQuant-PTQ4ViT (twin-uniform)",
             "noisyquant-ptq4vit+reparam": "NoisyQuant-PTQ4ViT + reparam",
             "noisyquant-ptq4vit+reparam+bc": "NoisyQuant-PTQ4ViT + reparam + bias correction",
             "noisyquant-ptq4vit+reparam+gptq+bc": "NoisyQuant-PTQ4ViT + reparam + GPTQ + bias correction",
             "noisyquant-ptq4vit+reparam+gptq-act+bc":
                 "NoisyQuant-PTQ4ViT + reparam + GPTQ on quantized inputs + bias correction",
             "noisyquant-ptq4vit+reparam+attn+gptq+bc":
                 "NoisyQuant-PTQ4ViT + reparam + attention reparam + GPTQ + bias correction",
             "noisyquant+reparam+attn": "NoisyQuant + reparam + attention reparam",
             "noisyquant-ptq4vit+reparam+fit16": "NoisyQuant-PTQ4ViT + reparam, searches on 16 images",
             "easyquant+pearson+rank+bc": "PTQ-ViT (Pearson + ranking loss + bias correction)",
             "noisyquant+pearson+rank+bc": "NoisyQuant on PTQ-ViT (Pearson + ranking + bias correction)"}


def weight_bits(parts: list[str]) -> int | None:
    """The weight bits a methods row names with a ``w<N>`` option (``None``: the row's own bit-width)."""
    return next((int(p[1:]) for p in parts[1:] if p[:1] == "w" and p[1:].isdigit()), None)


def row_width(e: dict) -> float:
    """A methods row's bits: a budget row's are its average, not the 8 it is given as."""
    return e["average_bits"] if "+budget" in e["row"] else e["bits"]


def row_label(row: str) -> str:
    """A methods row's label: ``ROW_LABEL``'s, and for a ``+budget<B>`` row the method's with its budget."""
    parts = row.split("+")
    weights = weight_bits(parts)
    if weights is not None:
        rest = "+".join(p for p in parts if p != f"w{weights}")
        return f"{row_label(rest)}, {weights}-bit weights"
    budget = next((p[len("budget"):] for p in parts if p.startswith("budget")), None)
    if budget is None:
        return ROW_LABEL.get(row, row)
    method = "+".join(p for p in parts if not p.startswith("budget"))
    return f"{ROW_LABEL.get(method, method)}, mixed precision at {budget} bits"


def _methods_table(rows: dict, fp32: float, images: int, ms) -> list[str]:
    """One run's rows, widest first, each against the same run's EasyQuant row at its width."""
    lines = [f"| bits | method | top-1 % ({images} CIFAR-10) | vs FP32 | held-out MSE | vs EasyQuant | convert s |"
             + (" batch-8 ms (x FP32) |" if ms else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if ms else ""),
             f"| 32 | FP32 | {100 * fp32:.2f} | | 0 | | |" + (ms("fp32") if ms else "")]
    order = list(ROW_LABEL)
    for name, e in sorted(rows.items(), key=lambda kv: (-row_width(kv[1]), order.index(kv[1]["row"])
                                                        if kv[1]["row"] in order else len(order), kv[0])):
        bits, budget = e["bits"], "+budget" in e["row"]
        base = None if budget else rows.get(f"easyquant_w{bits}a{bits}")
        mse, top1 = e["imagenet_heldout"]["mse"], e["cifar"]["top1"]
        ratio = f"{mse / base['imagenet_heldout']['mse']:.3f}x" if base else "-"
        label = f"{row_width(e):.2f} avg" if budget else f"W{e.get('w_bits', bits)}A{bits}"
        lines.append(f"| {label} | {row_label(e['row'])} | {100 * top1:.2f} | {100 * (top1 - fp32):+.2f} | "
                     f"{mse:.4f} | {ratio} | {e['convert_s']:.0f} |" + (ms(name) if ms else ""))
    return lines


def runs(rows: dict) -> list[dict]:
    """A results file's rows split by the invocation that converted them (``methods.py --append`` adds one per
    call), oldest first: rows of different invocations are never put in one table."""
    out: dict = {}
    for name, e in rows.items():
        out.setdefault(e.get("invocation") or 0.0, {})[name] = e
    return [out[k] for k in sorted(out)]


def methods_markdown(results: dict, source) -> str:
    """The methods tables (``benchmarks/methods.py``), one per invocation: every row's top-1, held-out output MSE
    against the same run's EasyQuant row, convert time, the gap to FP32, and what the run's rows compare."""
    fp32 = results["fp32"]["cifar"]["top1"]
    settings = results["settings"]
    images = settings["cifar_per_class"] * 10
    latency = results.get("latency_batch8") or {}

    def ms(name: str) -> str:
        e = latency.get(name)
        return f" {e['median_ms']:.0f} ({e['ratio_to_fp32']:.2f}x) |" if e else " - |"

    lines, parts = [], runs(results["rows"])
    for i, rows in enumerate(parts, 1):
        title = f"**Run {i} of {len(parts)}** (rows converted together in one process):" if len(parts) > 1 else ""
        findings = methods_findings(rows, fp32, images)
        lines += ([title, ""] if title else []) + _methods_table(rows, fp32, images, ms if latency else None)
        lines += ["", findings, ""] if findings else [""]
    if latency:
        runs_ = latency["fp32"].get("runs", "?")
        lines += [f"Batch-8 latency: every model above timed in one separate run, median of {runs_} interleaved "
                  f"runs per model, onnxruntime CPU EP, 2 threads "
                  f"({cpu_line({'cpu': results['latency_machine']['cpu']})[5:-1]}).", ""]
    return "\n".join(lines) + (
        f"\nEvery run: {settings['calib_size']} ImageNet calibration images (seed {settings['seed']}), held-out "
        f"output MSE on {settings['imagenet_eval']} other ImageNet images, the same images in every run. "
        f"{cpu_line(results)} {blas_line(results)} {conditions_line(results, source)} Source: `{source}` "
        "(`python benchmarks/methods.py`).")


def overhead_markdown(data: dict, source) -> str:
    """The README's paragraph on what the noise costs at inference, from ``noise_overhead.json``."""
    b1, b8, models = data["batch1"], data["batch8"], data["models"]

    def pct(stats: dict, name: str) -> str:
        return f"{100 * (stats[name]['ratio_to_plain_qdq'] - 1):+.1f} %"

    return (f"`python benchmarks/noise_overhead.py` measures the noise's inference cost on the real ViT-S/14 "
            f"converted with the defaults (`{source}`), as latency against the plain-QDQ model of the same plan "
            f"without noise: with every noise "
            f"as an explicit `Add` ({models['explicit_adds']['noise_adds']} Adds) {pct(b8, 'explicit_adds')} at "
            f"batch 8 ({pct(b1, 'explicit_adds')} at batch 1); with the noise folded into the bias or "
            f"LayerNorm shift that produces the tensor ({models['folded']['noise_adds']} Adds left, where no such term "
            f"precedes the layer) {pct(b8, 'folded')} ({pct(b1, 'folded')} at batch 1). Medians of "
            f"{b8['plain_qdq']['runs']} (batch 8) and {b1['plain_qdq']['runs']} (batch 1) interleaved runs. "
            f"{cpu_line(data)} {conditions_line(data, source)}")


def _accuracy_findings(rows: dict, fp32: float) -> list[str]:
    """Per width, the "all together" row and the row with the lowest held-out MSE, against FP32."""
    out = []
    for bits in (6, 8):
        best = rows.get(f"all_w{bits}a{bits}")
        if best:
            out.append(f"W{bits}A{bits} all together: {100 * (best['cifar']['top1'] - fp32):+.2f} points against FP32")
        at = {n: e for n, e in rows.items() if e["bits"] == bits and "+budget" not in e["row"]
              and (weight_bits(e["row"].split("+")) or bits) == bits}
        if at:  # the best row by the held-out measure, not by the top-1 it is then read on (the max of many
            # noisy top-1 figures is biased upwards)
            name, e = min(at.items(), key=lambda kv: (kv[1]["imagenet_heldout"]["mse"], kv[0]))
            out.append(f"W{bits}A{bits} row with the lowest held-out MSE ({row_label(e['row'])}): "
                       f"{100 * (e['cifar']['top1'] - fp32):+.2f} points against FP32")
    return out


def _step_findings(rows: dict) -> list[str]:
    """What reparam under NoisyQuant, GPTQ and the full stack's extra steps do, per width."""
    out = []
    for bits in (8, 6, 4):
        rep, both = rows.get(f"easyquant+reparam_w{bits}a{bits}"), rows.get(f"noisyquant+reparam_w{bits}a{bits}")
        if rep and both:
            ratio = both["imagenet_heldout"]["mse"] / rep["imagenet_heldout"]["mse"]
            out.append(f"W{bits}A{bits} NoisyQuant on top of reparam: {ratio:.3f}x reparam alone's held-out MSE")
        eq, gptq = rows.get(f"easyquant_w{bits}a{bits}"), rows.get(f"easyquant+gptq_w{bits}a{bits}")
        if eq and gptq:
            ratio = gptq["imagenet_heldout"]["mse"] / eq["imagenet_heldout"]["mse"]
            out.append(f"W{bits}A{bits} GPTQ on EasyQuant: {ratio:.3f}x EasyQuant's held-out MSE")
    for bits in (8, 6, 4):  # the extra steps' convert time against the method's own, converted in the same run
        base = rows.get(f"noisyquant-ptq4vit_w{bits}a{bits}")
        for rounding, label in (("gptq", "GPTQ"), ("gptq-act", "GPTQ-act"), ("attn+gptq", "attention reparam + GPTQ")):
            full = rows.get(f"noisyquant-ptq4vit+reparam+{rounding}+bc_w{bits}a{bits}")
            if base and full:
                out.append(f"W{bits}A{bits} reparam + {label} + bias correction on NoisyQuant-PTQ4ViT: "
                           f"{full['convert_s'] / base['convert_s']:.2f}x its convert time")
    return out


def methods_findings(rows: dict, fp32: float, images: int = 2000) -> str:
    """The comparisons a methods file's rows allow, computed from the rows that exist."""
    out = _accuracy_findings(rows, fp32) + _step_findings(rows)
    for method in ("noisyquant", "noisyquant+reparam", "noisyquant+reparam+attn", "noisyquant-ptq4vit+reparam"):
        mixed, uniform = rows.get(f"{method}+budget6.0_w8a8"), rows.get(f"{method}_w6a6")
        if mixed and uniform:
            gain = 100 * (mixed["cifar"]["top1"] - uniform["cifar"]["top1"])
            ratio = mixed["imagenet_heldout"]["mse"] / uniform["imagenet_heldout"]["mse"]
            out.append(f"{ROW_LABEL.get(method, method)} at a 6.0-bit budget against the same at uniform W6A6: "
                       f"{gain:+.2f} points, held-out MSE {ratio:.2f}x")
    if not out:
        return ""
    return f"Comparisons (top-1 on {images} CIFAR-10 images): " + "; ".join(out) + "."


def main(argv: list[str]) -> None:
    if "--docs" in argv or "--readme" in argv:  # --readme: the flag's former name
        from table_docs import update_docs

        update_docs(Path(__file__).resolve().parent.parent)
        return
    path = Path(argv[1])
    data = json.loads(path.read_text())
    if path.stem.startswith("cpu_exact"):
        print(cpu_markdown(data, path))
    else:
        print(methods_markdown(data, path) if path.stem.startswith("methods") else markdown(data, path))


if __name__ == "__main__":
    main(sys.argv)
