"""The mixed-precision additivity check of ``mixed_additivity.py`` (rendered by ``table.py --docs``; the study's
table and chart come from its sweep, ``table_sweep``)."""

from __future__ import annotations

from table import conditions_line, cpu_line


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


