"""The compile-cost tables (``benchmarks/compile_cost.py``): per row the wall time and peak memory of one
conversion, its stages as bars, and, for the real model, held-out quality; then what the rows of the same run
compare (candidate screening, the read-token weighting, fewer token rows, coarse-to-fine grids).

Rows that ``--before DIR`` converted with another checkout (a ``source`` key) measure other code than the one the
docs describe, so they are left out. Rendered by ``table.py --docs``.
"""

from __future__ import annotations

from table import blas_line, conditions_line, cpu_line

STAGES = (("calibrate_s", "calibration pass"), ("search.simulate_s", "simulation"),
          ("search.linear_search_s", "linear-layer search"), ("search.act_matmul_search_s", "attention-matmul search"),
          ("search.mixed_precision_s", "mixed-precision sensitivities"), ("search.rounding_s", "rounding"),
          ("rewrite_s", "graph passes"))


def product_rows(results: dict) -> dict:
    """The rows this checkout converted (not ``--before`` rows of another checkout)."""
    return {name: e for name, e in results["rows"].items() if "source" not in e}


def _stages(e: dict) -> dict[str, float]:
    """Seconds per stage of one conversion; what the named stages do not cover is "other" (loading, saving,
    checking, preparing images)."""
    t = e["timings"]
    out = {label: t[key] for key, label in STAGES if t.get(key)}
    out["other"] = max(e["convert_s"] - sum(out.values()), 0.0)
    return out


def _quality(before: dict, after: dict) -> str:
    """How held-out quality moves from the scored row ``before`` to ``after``."""
    ratio = after["imagenet_heldout"]["mse"] / before["imagenet_heldout"]["mse"]
    return f"held-out MSE {ratio:.3f}x, top-1 {100 * (after['cifar']['top1'] - before['cifar']['top1']):+.2f} points"


def _row_lines(rows: dict) -> list[str]:
    lines = ["| row | model (M params) | method | grid stride | screening | read-token share | calib images | "
             "convert s | peak MB | s per M params | held-out MSE | top-1 % |", "|---" * 12 + "|"]
    for name, e in rows.items():
        screen = f"{e['screen_tokens']} rows, best {e['screen_keep']}" if e.get("screen_tokens") else "off"
        runs = e.get("convert_s_runs", [])
        spread = f" ({min(runs):.1f}-{max(runs):.1f}, {len(runs)} runs)" if len(runs) > 1 else ""
        scored = (f"{e['imagenet_heldout']['mse']:.4f} | {100 * e['cifar']['top1']:.2f} |" if "cifar" in e
                  else "- | - |")
        lines.append(f"| {name} | {e['model']} ({e['parameters_m']:.1f}) | {e['method']} W{e['bits']}A{e['bits']} | "
                     f"{e['grid_stride']} | {screen} | {e.get('read_token_share', 0.0):g} | {e['calib_images']} | "
                     f"{e['convert_s']:.1f}{spread} | {e['peak_rss_mb']:.0f} | "
                     f"{e['convert_s'] / e['parameters_m']:.2f} | {scored}")
    lines += ["", "Where the seconds go (each block is 5 s):", "", "| row | stage | s | |", "|---|---|---|---|"]
    for name, e in rows.items():
        lines += [f"| {name} | {stage} | {seconds:.1f} | {'█' * max(int(round(seconds / 5)), 0)} |"
                  for stage, seconds in _stages(e).items()]
    return lines


def _pair_lines(rows: dict, bits: int) -> list[str]:
    """What the run's variants of the W<bits>A<bits> row change, against that row."""
    def pair(suffix: str) -> tuple[dict, dict] | None:
        base, other = rows.get(f"nq_w{bits}a{bits}"), rows.get(f"nq_w{bits}a{bits}{suffix}")
        return (base, other) if base and other and "cifar" in base and "cifar" in other else None

    w, out = f"W{bits}A{bits}", []
    if p := pair("_exact"):
        screened, exact = p
        linear = [e["timings"]["search.linear_search_s"] for e in (exact, screened)]
        out.append(f"- {w}, candidate screening against scoring every candidate on all rows: "
                   f"{exact['convert_s'] / screened['convert_s']:.2f}x faster in all, {linear[0] / linear[1]:.2f}x "
                   f"in the linear-layer search, {_quality(exact, screened)}.")
    if p := pair("_uniform_rows"):
        weighted, uniform = p
        out.append(f"- {w}, the read token (the class token) given {weighted['read_token_share']:g} of each "
                   f"search's rows against every row once: {_quality(uniform, weighted)} "
                   f"({uniform['imagenet_heldout']['mse']:.4f} -> {weighted['imagenet_heldout']['mse']:.4f}), "
                   f"convert {uniform['convert_s']:.0f} -> {weighted['convert_s']:.0f} s.")
    if p := pair("_tokens512"):
        full, fewer = p
        out.append(f"- {w}, 512 token rows per search instead of 1,024: {full['convert_s'] / fewer['convert_s']:.2f}x "
                   f"faster ({full['convert_s']:.1f} -> {fewer['convert_s']:.1f} s), {_quality(full, fewer)}.")
    if p := pair("_grid3"):
        fine, coarse = p
        out.append(f"- {w}, coarse-to-fine grids (stride 3) against every grid point (stride 1): "
                   f"{fine['convert_s'] / coarse['convert_s']:.2f}x faster, {_quality(fine, coarse)}.")
    return out


def cost_markdown(results: dict, source) -> str:
    """One compile-cost results file: the table, the stage bars, the comparisons, the conditions."""
    rows = product_rows(results)
    lines = _row_lines(rows)
    pairs = [line for bits in (8, 6) for line in _pair_lines(rows, bits)]
    lines += ["", *pairs] if pairs else []
    settings = results.get("settings", {})
    return "\n".join(lines) + (
        f"\n\nEach conversion alone in a fresh process, evaluation off; top-1 on "
        f"{settings.get('cifar_per_class', 0) * 10} CIFAR-10 images, held-out MSE on {settings.get('imagenet_eval')} "
        f"ImageNet images no conversion saw. {cpu_line(results)} {blas_line(results)} "
        f"{conditions_line(results, source)} Source: `{source}`.")
