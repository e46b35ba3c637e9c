"""Where a conversion's seconds go: the docs' profile chart and table, from a compile-cost results file
(``benchmarks/compile_cost.py``, each conversion's ``timings``, the same values ``convert --profile`` writes).

One horizontal bar per row and file, stacked in the order the stages run: loading, the calibration pass, the
search split into its parts (the sequential simulation, the linear-layer search split into its phases where the
row's code recorded them, the attention-matmul search, rounding, the planner's own work) and the rewrite, checker
and save; whatever the recorded stages do not cover of the row's wall time is "other". One chart and table per
results file (one run, one CPU, one set of BLAS kernels). Rendered by ``table.py --docs``.
"""

from __future__ import annotations

from pathlib import Path

from table import blas_line, conditions_line, cpu_line
from table_cost import product_rows

# (timings key, label) in the order a conversion runs them; the linear-layer search is split where recorded
SEGMENTS = (
    ("load_s", "load model and data"),
    ("calibrate_s", "calibration pass"),
    ("search.simulate_s", "simulation"),
    ("search.linear.weight_steps_s", "weight steps"),
    ("search.linear.error_terms_s", "error terms"),
    ("search.linear.act_steps_s", "activation steps"),
    ("search.linear.noise_s", "noise search"),
    ("search.linear.held_out_s", "held-out noise check"),
    ("search.linear_search_s", "linear search, rest"),
    ("search.act_matmul_search_s", "attention-matmul search"),
    ("search.mixed_precision_s", "mixed-precision sensitivities"),
    ("search.rounding_s", "rounding"),
    ("search_s", "search, rest"),
    ("rewrite_s", "graph passes"),
    ("check_s", "checker"),
    ("save_s", "save"),
)
PHASES = tuple(key for key, _ in SEGMENTS if key.startswith("search.linear."))
UNSPLIT = "linear search (phases not recorded)"  # rows of code before convert --profile
ORDER = [label for _, label in SEGMENTS[:8]] + [UNSPLIT] + [label for _, label in SEGMENTS[8:]] + ["other"]
SEARCH_PARTS = ("search.simulate_s", "search.linear_search_s", "search.act_matmul_search_s",
                "search.mixed_precision_s", "search.rounding_s")


def segments(entry: dict) -> dict[str, float]:
    """Seconds per segment of one row (labels of :data:`SEGMENTS`, in order): a total (the linear-layer search, the
    search) shows only what its recorded parts leave, and the row's wall time beyond every stage is "other"."""
    t = entry["timings"]
    out = {}
    for key, label in SEGMENTS:
        if key not in t:
            continue
        seconds = t[key]
        if key == "search.linear_search_s":
            seconds -= sum(t.get(k, 0.0) for k in PHASES)
            label = label if any(k in t for k in PHASES) else UNSPLIT
        elif key == "search_s":
            seconds -= sum(t.get(k, 0.0) for k in SEARCH_PARTS)
        out[label] = max(seconds, 0.0)
    out["other"] = max(entry["convert_s"] - sum(out.values()), 0.0)
    return out


def bars(results: dict) -> list[tuple[str, dict[str, float]]]:
    """``(label, segments)`` per row of one results file (rows of another checkout left out), labelled by the
    file's BLAS kernels."""
    kernels = (results["machine"].get("blas") or {}).get("architecture") or "?"
    return [(f"{name} ({kernels} BLAS)", segments(entry)) for name, entry in product_rows(results).items()]


def profile_chart(results: dict, out: Path) -> None:
    """The stacked bars of :func:`bars` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = bars(results)
    labels = [label for label in ORDER if any(label in parts for _, parts in rows)]
    colours = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(10.0, 0.55 * len(rows) + 1.8), dpi=100)
    for y, (_, parts) in enumerate(rows):
        left = 0.0
        for i, label in enumerate(labels):
            seconds = parts.get(label, 0.0)
            ax.barh(y, seconds, left=left, color=colours[i % len(colours)], edgecolor="white", linewidth=0.5,
                    label=label if y == 0 or label not in rows[0][1] else None)
            left += seconds
        ax.text(left + 0.3, y, f"{left:.1f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("wall seconds")
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=5,
              frameon=False)
    fig.savefig(out, metadata={"Software": None}, bbox_inches="tight")
    plt.close(fig)


def profile_markdown(results: dict, source, chart) -> str:
    """The chart, and a table of every segment's seconds and share of its row's wall time."""
    rows = bars(results)
    labels = [label for label in ORDER if any(label in parts for _, parts in rows)]
    lines = [f"![where convert's seconds go]({chart})", "", "| segment | " + " | ".join(n for n, _ in rows) + " |",
             "|---" * (len(rows) + 1) + "|"]
    for label in labels:
        cells = []
        for _, parts in rows:
            total = sum(parts.values())
            cells.append(f"{parts[label]:.2f} ({100 * parts[label] / total:.0f} %)" if label in parts else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| **wall** | " + " | ".join(f"**{sum(p.values()):.1f}**" for _, p in rows) + " |")
    return "\n".join(lines) + (
        f"\n\nOne conversion per row (the row's median run, `--repeat`), evaluation off. {cpu_line(results)} "
        f"{blas_line(results)} {conditions_line(results, source)} Source: `{source}`.")
