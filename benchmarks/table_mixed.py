"""The mixed-precision sections of the README: the table and chart of ``methods.py --name mixed`` and the
additivity check of ``mixed_additivity.py`` (rendered by ``table.py --readme``)."""

from __future__ import annotations

from pathlib import Path

from nq_onnx.config import MixedSensitivity
from table import ROW_LABEL, blas_line, cpu_line

MIXED_BEGIN, MIXED_END = "<!-- mixed:begin -->", "<!-- mixed:end -->"
SENSITIVITIES = tuple(m.value for m in MixedSensitivity)  # row parts naming a mixed-precision sensitivity


def _mixed_lines(results: dict) -> dict[str, list[tuple[float, float, float, str]]]:
    """Per line (method, uniform or mixed): ``(average bits, top-1, held-out MSE, row name)`` sorted by bits."""
    lines: dict[str, list] = {}
    for name, e in results["rows"].items():
        parts = e["row"].split("+")
        method = "+".join(p for p in parts if not (p.startswith(("budget", "images")) or p in SENSITIVITIES))
        notes = [f"{p} sensitivity" for p in parts if p in SENSITIVITIES]
        notes += [f"sensitivities on {p[len('images'):]} images" for p in parts if p.startswith("images")]
        kind = "mixed precision" + (f" ({', '.join(notes)})" if notes else "") if "+budget" in e["row"] else "uniform"
        label = f"{ROW_LABEL.get(method, method)}, {kind}"
        lines.setdefault(label, []).append((e["average_bits"], e["cifar"]["top1"], e["imagenet_heldout"]["mse"], name))
    return {k: sorted(v) for k, v in sorted(lines.items())}


def mixed_chart(results: dict, out: Path) -> None:
    """Top-1 against average bits, one line per method (a PNG beside the results file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10.0, 4.2), dpi=100)
    for label, points in _mixed_lines(results).items():
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label=label)
    ax.axhline(100 * results["fp32"]["cifar"]["top1"], color="grey", linestyle=":", label="FP32")
    ax.set_xlabel("average bits (weights and activations, count-weighted)")
    ax.set_ylabel(f"top-1 % ({results['settings']['cifar_per_class'] * 10} CIFAR-10)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, metadata={"Software": None})
    plt.close(fig)


def mixed_markdown(results: dict, source, chart) -> str:
    """The mixed-precision table (``methods.py --name mixed``) and its chart."""
    fp32 = results["fp32"]["cifar"]["top1"]
    lines = ["| method | average bits | top-1 % | vs FP32 | held-out MSE | groups at 8/6/5/4 bits | convert s |",
             "|---|---|---|---|---|---|---|"]
    for label, points in _mixed_lines(results).items():
        for bits, top1, mse, name in points:
            e = results["rows"][name]
            groups = "/".join(str(e.get("bits_groups", {}).get(str(b), 0)) for b in (8, 6, 5, 4))
            groups = groups if e.get("bits_groups") else "-"
            lines.append(f"| {label} | {bits:.2f} | {100 * top1:.2f} | {100 * (top1 - fp32):+.2f} | {mse:.4f} | "
                         f"{groups} | {e['convert_s']:.0f} |")
    rows = results["rows"]
    mixed6, uniform6 = rows.get("noisyquant+budget6.0_w8a8"), rows.get("noisyquant_w6a6")
    if mixed6 and uniform6:
        gap = 100 * (mixed6["cifar"]["top1"] - uniform6["cifar"]["top1"])
        lines += ["", f"Goal: at a 6.0-bit budget, mixed precision + NoisyQuant >= uniform W6A6 NoisyQuant + 3 points: "
                      f"{'met' if gap >= 3 else '**missed**'} ({gap:+.2f} points; held-out MSE "
                      f"{mixed6['imagenet_heldout']['mse'] / uniform6['imagenet_heldout']['mse']:.2f}x uniform's)."]
        stack = rows.get("noisyquant-ptq4vit+reparam+budget6.0_w8a8")
        stack6 = rows.get("noisyquant-ptq4vit+reparam_w6a6")
        if stack and stack6:
            top1, own = (100 * (stack["cifar"]["top1"] - r["cifar"]["top1"]) for r in (uniform6, stack6))
            verdict = "met" if top1 >= 3 else "missed"
            lines += ["", f"On the best stack (NoisyQuant-PTQ4ViT + reparam) a 6.0-bit budget scores {top1:+.2f} "
                          f"points over uniform W6A6 NoisyQuant, which is the goal's letter ({verdict}), but "
                          f"mixed precision's own share is {own:+.2f} points over the same stack at uniform W6A6 "
                          f"(held-out MSE {stack['imagenet_heldout']['mse'] / stack6['imagenet_heldout']['mse']:.2f}x "
                          "its); the rest is PTQ4ViT's quantizers and the reparameterization."]
    return "\n".join(lines) + (
        f"\n\n![top-1 against average bits]({chart})\n\nFP32 {100 * fp32:.2f} %. "
        f"{results['settings']['calib_size']} ImageNet calibration images, held-out MSE on "
        f"{results['settings']['imagenet_eval']} other ImageNet images. {cpu_line(results)} Source: `{source}`.")


ADDITIVITY_BEGIN, ADDITIVITY_END = "<!-- mixed-additivity:begin -->", "<!-- mixed-additivity:end -->"


def additivity_markdown(data: dict, source) -> str:
    """The output MSE of uniform widths and of the knapsack's assignments from the searched single-group changes,
    predicted and measured (``benchmarks/mixed_additivity.py``)."""
    settings, uniform = data["settings"], data["uniform_mse"]
    lines = ["| model | average bits | MSE, fit images | MSE, held-out images |", "|---|---|---|---|"]
    for bits in sorted(uniform["fit"], key=int, reverse=True):
        lines.append(f"| uniform W{bits}A{bits} | {int(bits):.2f} | {uniform['fit'][bits]:.4f} | "
                     f"{uniform['held_out'][bits]:.4f} |")
    for choices, a in data["assignments"].items():
        groups = ", ".join(f"{n} at {b}" for b, n in sorted(a["groups_per_width"].items(), key=lambda t: -int(t[0])))
        lines.append(f"| knapsack over {{{choices.replace('/', ', ')}}} bits ({groups}) | {a['average_bits']:.2f} | "
                     f"{a['fit_mse']:.4f} (predicted {a['predicted_fit_mse']:.4f}) | {a['held_out_mse']:.4f} |")
    base = settings["base"]
    summed = "; ".join(f"all at {b} bits: predicted {v['predicted']:.4f}, measured {v['actual']:.4f}"
                       for b, v in sorted(data["summed_single_changes"].items(), key=lambda t: -int(t[0])))
    changes = data["changes"].values()
    odd = (f"Of the {len(changes)} groups, {sum(c['4'] < 0 for c in changes)} lower the fit images' MSE by dropping "
           f"from {base} to 4 bits, {sum(c['8'] > 0 for c in changes)} raise it by going to 8, and "
           f"{sum(c['4'] < c['5'] for c in changes)} measure lower at 4 bits than at 5: at this operating point one "
           "group's width moves the logits of a few images by about as much in either direction.")
    return "\n".join(lines) + (
        f"\n\n{odd} The uniform {base}-bit model's fit-image MSE plus every group's single change, against the "
        f"model with every group moved ({summed}). Output MSE of the logits against FP32; fit images: the first "
        f"{settings['fit_images']} calibration images (the sensitivities' and the searches'); held-out: "
        f"{settings['held_out']} ImageNet images outside the {settings['calib_size']} calibration images. "
        f"{cpu_line(data)} Source: `{source}`.")


IMAGES_BEGIN, IMAGES_END = "<!-- mixed-images:begin -->", "<!-- mixed-images:end -->"
IMAGES_METHODS = ("noisyquant", "noisyquant+reparam")  # the methods issue 16's goal is read on, same stack both sides


def images_markdown(files: list[tuple[dict, str]]) -> str:
    """Mixed precision at a 6.0-bit budget with sensitivities on 1 and on 4 images against the same method at
    uniform W6A6, per seed (``files``: every methods results file of the same CPU, BLAS kernels and settings; a
    seed's rows may be spread over several files), and issue 16's goal on the seeds' mean."""
    seeds: dict[int, dict] = {}
    for results, _ in files:
        seeds.setdefault(results["settings"]["seed"], {}).update(results["rows"])
    order = sorted(seeds)
    variants = (("uniform W6A6", "{m}_w6a6"), ("6.0-bit budget, sensitivities on 1 image", "{m}+budget6.0_w8a8"),
                ("6.0-bit budget, sensitivities on 4 images", "{m}+budget6.0+images4_w8a8"))
    head = " | ".join(f"seed {s}: top-1 % / held-out MSE" for s in order)
    lines = [f"| method | precision | {head} | mean top-1 % | mean held-out MSE | mean convert s |",
             "|---|---|" + "---|" * len(order) + "---|---|---|"]
    verdicts = []
    for method in IMAGES_METHODS:
        means = {}
        for label, pattern in variants:
            rows = [seeds[s].get(pattern.format(m=method)) for s in order]
            if any(r is None for r in rows):
                continue
            top1 = [r["cifar"]["top1"] for r in rows]
            mse = [r["imagenet_heldout"]["mse"] for r in rows]
            means[label] = (sum(top1) / len(top1), sum(mse) / len(mse))
            cells = " | ".join(f"{100 * t:.2f} / {m:.4f}" for t, m in zip(top1, mse))
            lines.append(f"| {ROW_LABEL.get(method, method)} | {label} | {cells} | {100 * means[label][0]:.2f} | "
                         f"{means[label][1]:.4f} | {sum(r['convert_s'] for r in rows) / len(rows):.0f} |")
        uniform = means.get(variants[0][0])
        for label, _ in variants[1:]:
            if uniform and label in means:
                gain = 100 * (means[label][0] - uniform[0])
                verdicts.append(f"{ROW_LABEL.get(method, method)}, {label}: {gain:+.2f} points over uniform W6A6 "
                                f"(held-out MSE {means[label][1] / uniform[1]:.2f}x; "
                                f"{'met' if gain >= 3 else '**missed**'}: the goal is +3)")
    first = files[0][0]
    sources = ", ".join(f"`{src}`" for _, src in files)
    return ("\n".join(lines) + f"\n\nIssue 16's goal on the mean of {len(order)} seeds: {'; '.join(verdicts)}.\n\n"
            f"FP32 {100 * first['fp32']['cifar']['top1']:.2f} % on the same "
            f"{first['settings']['cifar_per_class'] * 10} CIFAR-10 images; each seed draws its own 128 calibration "
            f"and 200 held-out ImageNet images. {cpu_line(first)} {blas_line(first)} Sources: {sources}.")
