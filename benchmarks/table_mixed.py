"""The mixed-precision sections of the docs: the table and chart of ``methods.py --name mixed_vnni`` and the
additivity check of ``mixed_additivity.py`` (rendered by ``table.py --docs``)."""

from __future__ import annotations

from pathlib import Path

from nq_onnx.core.config import MixedSensitivity
from table import ROW_LABEL, blas_line, conditions_line, cpu_line, runs

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


def _budget_lines(rows: dict) -> list[str]:
    """A 6.0-bit budget against uniform W6A6, for plain NoisyQuant and for the NoisyQuant-PTQ4ViT + reparam
    stack, where the run has both rows."""
    lines = []
    mixed6, uniform6 = rows.get("noisyquant+budget6.0_w8a8"), rows.get("noisyquant_w6a6")
    if mixed6 and uniform6:
        gap = 100 * (mixed6["cifar"]["top1"] - uniform6["cifar"]["top1"])
        lines += ["", f"At a 6.0-bit budget, mixed precision + NoisyQuant against uniform W6A6 NoisyQuant: "
                      f"{gap:+.2f} points; held-out MSE "
                      f"{mixed6['imagenet_heldout']['mse'] / uniform6['imagenet_heldout']['mse']:.2f}x uniform's."]
    stack, stack6 = rows.get("noisyquant-ptq4vit+reparam+budget6.0_w8a8"), rows.get("noisyquant-ptq4vit+reparam_w6a6")
    if stack and stack6:
        own = 100 * (stack["cifar"]["top1"] - stack6["cifar"]["top1"])
        lines += ["", f"On NoisyQuant-PTQ4ViT + reparam, a 6.0-bit budget against the same stack at uniform W6A6: "
                      f"{own:+.2f} points (held-out MSE "
                      f"{stack['imagenet_heldout']['mse'] / stack6['imagenet_heldout']['mse']:.2f}x)."]
    return lines


def mixed_markdown(results: dict, source, chart) -> str:
    """The mixed-precision table (``methods.py --name mixed_vnni``) and its chart: one run's rows only."""
    if len(runs(results["rows"])) > 1:
        raise SystemExit(f"{source}: rows of several invocations; the chart would mix runs")
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
    lines += _budget_lines(results["rows"])
    return "\n".join(lines) + (
        f"\n\n![top-1 against average bits]({chart})\n\nFP32 {100 * fp32:.2f} %. "
        f"{results['settings']['calib_size']} ImageNet calibration images, held-out MSE on "
        f"{results['settings']['imagenet_eval']} other ImageNet images. {cpu_line(results)} {blas_line(results)} "
        f"{conditions_line(results, source)} Source: `{source}`.")


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
        f"{cpu_line(data)} {conditions_line(data, source)} Source: `{source}`.")


