"""One self-contained HTML report of a conversion: the verdict, the settings, per-layer error, histograms.

The page opens with the verdict a reader wants first, the rows the summary ends with
(:func:`nq_onnx.report.summary.verdict`:
output error against FP32 and the inputs it was measured on, top-1 with labels, latency against FP32 when timed,
whether onnxruntime runs integer kernels for the plan's target), then every setting with its value, the versions, the
CPU and the command line (:mod:`nq_onnx.report.sections`), then the per-layer tables and the figures.

For each linear layer ``f(X) = X W + B`` of a noisy group the report compares, on float activations ``X``::

    EasyQuant:   q_s0(X) dq(W_q) + B                 (s0: the EasyQuant step before the noise search)
    NoisyQuant:  q_s(X + N) dq(W_q) + B - N dq(W_q)   (s: the step chosen for X + N)

and shows, as the paper's Figure 1, histograms of ``X``, ``X + N``, the quantized values and the layer output
of FP32 vs EasyQuant vs NoisyQuant (linear and log scale) for the layers with the largest error and every
``fc2`` (post-GELU input). The per-layer table's MSE figures are those the search measured on its token sample
(sequentially quantized inputs), stored in the plan. Figures are matplotlib PNGs embedded as data URIs, so the
page needs no network; ``report_dir`` also writes them as files, with the numbers as ``report.json``.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
from pathlib import Path

import numpy as np

from nq_onnx.search import theorem

from nq_onnx.core import naming
from nq_onnx.core.atomic import write_bytes_atomic
from nq_onnx.calibration.collect import sample_rows
from nq_onnx.passes.base import import_graph
from nq_onnx.passes.find_layers import ACT_MATMUL, Layers
from nq_onnx.passes.quantized_layers import quantized_layers
from nq_onnx.core.plan import Plan
from nq_onnx.search.mixed import BIT_CHOICES, assignment_point, pareto_front
from nq_onnx.report.figures import group_figure, pareto_chart, png, reduction_chart
from nq_onnx.report.sections import environment_rows, settings_html, settings_rows, verdict_html
from nq_onnx.report.summary import verdict

MAX_HISTOGRAM_LAYERS = 12
SAMPLE_ROWS = 2048
THEOREM_LAYERS = 4
THEOREM_WIDTHS = np.arange(0.0, 2.01, 0.25)  # noise widths in units of the group's EasyQuant step


@dataclasses.dataclass
class ReportData:
    """Everything the report shows, as plain values (``to_dict`` is the JSON written beside the page)."""

    model: str
    config: dict
    calibration: dict
    methods: dict[str, dict[str, float]]
    layers: list[dict]
    # the verdict the page opens with, as (what, value) rows (nq_onnx.report.summary.verdict), and what it rests on
    verdict: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    evaluation: dict = dataclasses.field(default_factory=dict)  # nq_onnx.report.summary.Evaluation
    latency: dict = dataclasses.field(default_factory=dict)  # nq_onnx.report.summary.Latency
    kernels: dict = dataclasses.field(default_factory=dict)  # nq_onnx.report.summary.Kernels
    # every config field and value, then the versions, the CPU and the command line (nq_onnx.report.sections)
    settings: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    theorem: dict[str, dict] = dataclasses.field(default_factory=dict)  # noise-width curves (nq_onnx.search.theorem)
    # under a bits budget: the assignment's Pareto front, the uniform widths and this plan (nq_onnx.search.mixed)
    precision: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def layer_rows(layers: Layers, plan: Plan) -> list[dict]:
    """The per-layer table: ranges, steps, noise and the search's output MSE per method."""
    rows = []
    for spec in layers.layers:
        lp = plan.layers[spec.name]
        group = layers.group_of(spec.inputs[0])  # an attention matmul shows its first operand's quantizer
        gp = plan.groups.get(group.name)
        search = lp.search
        eq, nq = search.get("mse_easyquant"), search.get("mse_noisyquant")
        # LayerNorm factors r of a linear layer's input, or the Q/K balance s of an attention scores matmul
        factors = gp.reparam.scale if gp is not None and gp.reparam is not None else (
            lp.attention.scale if lp.attention is not None else None)
        row = {
            "layer": spec.name,
            "op": spec.op if spec.kind != ACT_MATMUL else "MatMul (activations)",
            "group": group.name,
            "bits": f"W{lp.bits}A{gp.bits}" if spec.kind != ACT_MATMUL and gp is not None else
                    "A" + "/A".join(str(plan.groups[layers.group_of(t).name].bits) for t in spec.inputs
                                    if layers.group_of(t).name in plan.groups),
            "input_min": gp.input_range[0] if gp and gp.input_range else None,
            "input_max": gp.input_range[1] if gp and gp.input_range else None,
            "act_scale": gp.scale if gp else None,
            "twin": dataclasses.asdict(gp.twin) if gp is not None and gp.twin is not None else None,
            "signed": gp.signed if gp else True,
            "noise_min": float(gp.noise.min()) if gp is not None and gp.noise is not None else 0.0,
            "noise_max": float(gp.noise.max()) if gp is not None and gp.noise is not None else 0.0,
            "noise_shift": gp.noise_shift if gp else 0.0,
            "noise_amplitude": gp.noise_amplitude if gp else 0.0,
            "mse_minmax": search.get("mse_minmax"),
            "mse_easyquant": eq,
            "mse_noisyquant": nq,
            "reduction_pct": 100.0 * (1.0 - nq / eq) if eq and nq is not None else None,
            "reparam_min": float(factors.min()) if factors is not None else None,
            "reparam_max": float(factors.max()) if factors is not None else None,
            "weight_error_nearest": search.get("weight_error_nearest"),
            "weight_error_gptq": search.get("weight_error_gptq"),
            "mse_nearest": search.get("mse_nearest"),
            "mse_gptq": search.get("mse_gptq"),
            "gptq_kept": lp.weight_codes is not None,
            "mse_before_bias_correction": search.get("mse_before_bias_correction"),
            "mse_after_bias_correction": search.get("mse_after_bias_correction"),
            "bias_corrected": lp.bias_correction is not None,
        }
        rows.append(row)
    return rows


def histogram_groups(layers: Layers, plan: Plan, rows: list[dict]) -> list[str]:
    """Noisy groups to draw: every fc2-like (post-GELU) input, then the layers with the largest error."""
    noisy = [g for g in layers.groups if g.noisy and plan.groups.get(g.name) is not None]
    chosen = [g.name for g in noisy if any(naming.is_mlp_output(c) for c in g.consumers)]
    by_error = sorted(
        (r for r in rows if r["mse_easyquant"] is not None and r["group"]),
        key=lambda r: -(r["mse_noisyquant"] if r["mse_noisyquant"] is not None else r["mse_easyquant"]),
    )
    for row in by_error:
        if row["group"] not in chosen and any(g.name == row["group"] for g in noisy):
            chosen.append(row["group"])
        if len(chosen) >= MAX_HISTOGRAM_LAYERS:
            break
    return chosen[:MAX_HISTOGRAM_LAYERS]


STYLE = """<style>
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
th { background: #eef; }
table.sortable th { cursor: pointer; }
#verdict th, #verdict td, #settings th, #settings td { text-align: left; }
#verdict { font-size: 15px; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
code { background: #f4f4f4; padding: 1px 4px; }
@media print { table.sortable th { cursor: auto; } img { page-break-inside: avoid; } }
</style>"""

SCRIPT = """<script>
document.querySelectorAll("table.sortable th").forEach((th, col) => {
  th.addEventListener("click", () => {
    const body = th.closest("table").tBodies[0];
    const key = r => { const c = r.cells[col]; const v = c.dataset.v !== undefined ? c.dataset.v : c.textContent;
                        const n = parseFloat(v); return isNaN(n) ? v : n; };
    const asc = th.dataset.asc !== "1"; th.dataset.asc = asc ? "1" : "0";
    Array.from(body.rows).sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (asc ? 1 : -1))
      .forEach(r => body.appendChild(r));
  });
});
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const ok = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.ready = ok + "/" + images.length;
});
</script>"""


def _step(row: dict, num) -> str:
    """The activation step, or both steps of a twin-uniform or split quantizer (fine / coarse)."""
    twin = row.get("twin")
    if twin is None:
        return f"{num(row['act_scale'])}{'' if row['signed'] else ' (unsigned)'}"
    searched_fine = twin["kind"] in ("softmax", "split")
    fine, coarse = (row["act_scale"], twin["fixed"]) if searched_fine else (twin["fixed"], row["act_scale"])
    label = "split" if twin["kind"] == "split" else f"twin {twin['kind']}"
    return f"{label}: {num(fine)} / {num(coarse)}"


def _mechanism_table(layers: list[dict], num) -> str:
    """Per layer, what LayerNorm reparameterization (the range of its factors r) or attention reparameterization
    (of the Q/K balance s), GPTQ or GPTQ-act (held-out weight
    error and layer output MSE, nearest and rounded: the MSE decides) and bias correction (held-out layer output MSE
    before and after) did; empty without them."""
    keys = ("reparam_min", "weight_error_nearest", "mse_before_bias_correction")
    rows = "".join(
        f"<tr><td>{html.escape(r['layer'])}</td><td>{num(r['reparam_min'], '{:.3g}')} .. "
        f"{num(r['reparam_max'], '{:.3g}')}</td><td>{num(r['weight_error_nearest'])}</td>"
        f"<td>{num(r['weight_error_gptq'])}</td><td>{num(r['mse_nearest'])}</td>"
        f"<td>{num(r['mse_gptq'])}{'' if r['gptq_kept'] else ' (kept nearest)'}</td>"
        f"<td>{num(r['mse_before_bias_correction'])}</td><td>{num(r['mse_after_bias_correction'])}"
        f"{'' if r['bias_corrected'] else ' (not applied)'}</td></tr>"
        for r in layers if any(r.get(k) is not None for k in keys)
    )
    if not rows:
        return ""
    return ("<h2>Reparameterization, rounding and bias correction</h2>\n<p>Held-out rows: weight error "
            "||X (W - dq(W))||&sup2; per element; layer output MSE with the activation quantizer.</p>\n"
            '<table id="mechanisms" class="sortable"><thead><tr><th>layer</th>'
            "<th>reparam r (LayerNorm) / s (Q K<sup>T</sup>)</th>"
            "<th>weight error nearest</th><th>weight error rounded</th><th>layer MSE nearest</th>"
            "<th>layer MSE rounded (GPTQ / GPTQ-act)</th><th>MSE before bias correction</th>"
            f"<th>MSE after</th></tr></thead>\n<tbody>{rows}</tbody></table>")


def render(data: ReportData, figures: dict[str, bytes], chart: str | None, histograms: list[str]) -> str:
    """The page: the verdict, the settings, the per-layer tables, then the figures."""
    def img(key: str, alt: str) -> str:
        uri = base64.b64encode(figures[key]).decode()
        return f'<img src="data:image/png;base64,{uri}" alt="{html.escape(alt)}">'

    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>nq-onnx report: {html.escape(data.model)}</title>
{STYLE}</head>
<body>
<h1>nq-onnx report: {html.escape(data.model)}</h1>
{verdict_html(data.verdict)}
{settings_html(data.settings)}
{_layers_html(data.layers)}
{_mechanism_table(data.layers, _num)}
{_figures_html(data, figures, chart, histograms, img)}
{SCRIPT}
</body></html>
"""


def _num(v, fmt="{:.4g}") -> str:
    return "-" if v is None else fmt.format(v)


def _layers_html(layers: list[dict]) -> str:
    num = _num
    rows = "".join(
        f"<tr><td>{html.escape(r['layer'])}</td><td>{html.escape(r['op'])}</td><td>{html.escape(r['bits'])}</td>"
        f'<td data-v="{r["input_min"] if r["input_min"] is not None else ""}">'
        f"{num(r['input_min'], '{:.3g}')} .. {num(r['input_max'], '{:.3g}')}</td>"
        f"<td>{_step(r, num)}</td>"
        f'<td data-v="{r["noise_max"] - r["noise_min"]}">{num(r["noise_min"], "{:.3g}")} .. '
        f"{num(r['noise_max'], '{:.3g}')}</td>"
        f"<td>{num(r['mse_easyquant'])}</td><td>{num(r['mse_noisyquant'])}</td>"
        f"<td>{num(r['reduction_pct'], '{:.1f}')}</td></tr>"
        for r in layers
    )
    return f"""<h2>Per layer</h2>
<p>Output MSE of each layer as its search measured it (on a token sample, earlier layers already quantized).
Click a column header to sort.</p>
<table id="layers" class="sortable"><thead><tr><th>layer</th><th>op</th><th>bits</th><th>input range</th>
<th>activation step</th><th>noise range</th><th>MSE EasyQuant</th><th>MSE NoisyQuant</th><th>reduction %</th>
</tr></thead>
<tbody>{rows}</tbody></table>"""


def _figures_html(data: ReportData, figures: dict[str, bytes], chart: str | None, histograms: list[str], img) -> str:
    """The mixed-precision trade-off, the reduction across depth, Theorem 1's curves and the histograms."""
    chart_html = f"<h2>Output-error reduction across depth</h2>{img(chart, 'reduction chart')}" if chart else ""
    precision_html = (
        "<h2>Mixed precision: the bit budget's trade-off</h2><p>Each group's sensitivity at 4, 5, 6 and 8 bits "
        "(<code>nq_onnx/search/mixed.py</code>) summed over the groups, against the count-weighted average bits: the "
        "knapsack's assignment at budgets from 4 to 8 bits (PTQ-ViT's Pareto front), one width for every group, and "
        f"this plan ({data.precision['chosen']['average_bits']:.2f} average bits; groups at 8/6/5/4 bits: "
        + "/".join(str(data.precision["chosen"]["groups"].get(str(b), 0)) for b in (8, 6, 5, 4))
        + ").</p>" + img("pareto", "sensitivity against average bits") if "pareto" in figures else ""
    )
    theorem_html = (
        "<h2>Theorem 1 on this model's activations</h2><p>The expected squared error of quantizing <code>X + N"
        "</code> and removing <code>N</code>, <code>N ~ U(-w/2, w/2)</code>, with each group's EasyQuant step "
        "held fixed: the theorem's closed form (lines) and the error measured with one fixed noise value per "
        "channel, as deployed (dots, mean and spread over noise seeds), relative to no noise "
        "(<code>nq_onnx/search/theorem.py</code>). Below 1, noise of that width alone lowers the input error.</p>"
        + img("theorem", "theorem 1 curves") if "theorem" in figures else ""
    )
    hist = "".join(f"<h3>{html.escape(name)}</h3>{img(name, 'histograms of ' + name)}" for name in histograms)
    return f"""{precision_html}
{chart_html}
{theorem_html}
<h2>Histograms</h2>
{hist if hist else "<p>No histograms: no noisy layer, or no data was given.</p>"}"""


def write_report(
    data: ReportData,
    figures: dict[str, bytes],
    chart: str | None,
    histograms: list[str],
    path: str | Path,
    report_dir: str | Path | None = None,
) -> None:
    write_bytes_atomic(path, render(data, figures, chart, histograms).encode())
    if report_dir is not None:
        folder = Path(report_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for key, png in figures.items():
            write_bytes_atomic(folder / f"{key.replace('/', '_')}.png", png)
        write_bytes_atomic(
            folder / "report.json", (json.dumps(data.to_dict(), indent=1, sort_keys=True) + "\n").encode()
        )


def theorem_curves(groups: list, samples: dict[str, np.ndarray], plan: Plan) -> dict[str, dict]:
    """Theorem 1's noise-width curve (:func:`nq_onnx.search.theorem.noise_width_curve`) on the float inputs of up to
    :data:`THEOREM_LAYERS` post-GELU (fc2) groups spread over depth, each at its EasyQuant step."""
    fc2 = [g for g in groups if any(naming.is_mlp_output(c) for c in g.consumers) and plan.groups[g.name].twin is None]
    picked = [fc2[round(i)] for i in np.linspace(0, len(fc2) - 1, min(THEOREM_LAYERS, len(fc2)))] if fc2 else []
    out = {}
    for group in dict.fromkeys(picked):
        gp = plan.groups[group.name]
        out[group.consumers[0]] = theorem.noise_width_curve(
            samples[group.tensor], gp.base_scale or gp.scale, gp.bits, THEOREM_WIDTHS, seeds=3, signed=gp.signed)
    return out


def _dequantized_weights(result, names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``(dq(W_q), B)`` in ``X @ W + B`` layout for the named linear layers: the layer values the passes emitted
    (:func:`~nq_onnx.passes.quantized_layers.quantized_layers`; GPTQ's codes too) and the float bias."""
    graph = import_graph(result.float_model)
    values = quantized_layers(graph, result.layers, result.plan)
    tensors = graph.tensors()
    out = {}
    for name in names:
        spec = result.layers.layer(name)
        w_q = values[name].weight.astype(np.float32)
        bias = tensors[spec.bias].values.astype(np.float32) if spec.bias else np.zeros(w_q.shape[1], np.float32)
        out[name] = (np.ascontiguousarray(w_q), bias)
    return out


def build_report(
    result,
    dataset,
    model_name: str,
    path: str | Path,
    report_dir: str | Path | None = None,
    command: str | None = None,
) -> ReportData:
    """Compute the figures of ``result`` (a conversion) on ``dataset`` (may be ``None``) and write the report; the
    verdict and its numbers come from ``result.summary``, ``command`` is shown with the settings."""
    rows = layer_rows(result.layers, result.plan)
    config = result.plan.config
    summary = result.summary
    calibration = {
        "inputs": len(dataset) if dataset is not None else 0,
        "unreadable_skipped": len(dataset.skipped) if dataset is not None else 0,
    }
    data = ReportData(
        model_name, config.to_dict(), calibration, dict(summary.metrics), rows, verdict(summary),
        *(dataclasses.asdict(v) if v is not None else {} for v in (summary.evaluation, summary.latency,
                                                                    summary.kernels)),
        settings_rows(config) + environment_rows(command, summary.calib_images),
    )
    figures: dict[str, bytes] = {}
    chart_png = reduction_chart(rows)
    chart = None
    if chart_png is not None:
        figures["reduction"] = chart_png
        chart = "reduction"
    modules = [g.precision for g in result.plan.groups.values() if g.precision is not None]
    if modules:
        bits = {g.name: g.bits for g in result.plan.groups.values() if g.precision is not None}
        data.precision = {
            "front": pareto_front(modules),
            "uniform": [assignment_point(modules, dict.fromkeys(bits, b)) for b in BIT_CHOICES],
            "chosen": assignment_point(modules, bits),
        }
        figures["pareto"] = pareto_chart(data.precision["front"], data.precision["uniform"],
                                         data.precision["chosen"])
    histograms = _histograms(result, dataset, rows, data, figures) if dataset is not None else []
    write_report(data, figures, chart, histograms, path, report_dir)
    return data


def _histograms(result, dataset, rows: list[dict], data: ReportData, figures: dict[str, bytes]) -> list[str]:
    """Draw the chosen groups' histograms and Theorem 1's curves on float activations of ``dataset`` into
    ``figures`` (the curves' numbers into ``data.theorem``); the groups drawn."""
    config = result.plan.config
    names = histogram_groups(result.layers, result.plan, rows)
    groups = [g for g in result.layers.groups if g.name in names]
    if not groups:
        return []
    subset = dataset.head(config.search.search_images)
    samples = sample_rows(result.float_model, [g.tensor for g in groups], subset, config.batch_size, SAMPLE_ROWS,
                          config.seed)
    weights = _dequantized_weights(result, [g.consumers[0] for g in groups])
    for group in groups:
        figures[group.name] = group_figure(group.name, samples[group.tensor], result.plan, result.layers, weights)
    data.theorem = theorem_curves(groups, samples, result.plan)
    if data.theorem:
        figures["theorem"] = png(theorem.plot(data.theorem))
    return [g.name for g in groups]
