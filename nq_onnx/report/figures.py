"""The report's matplotlib figures, as PNG bytes: the per-layer output-MSE reduction across depth and, per noisy
group, the paper's Figure 1 histograms (``X``, ``X + N``, the quantized values and the first layer's output in FP32,
EasyQuant and NoisyQuant, linear and log scale)."""

from __future__ import annotations

import io

import numpy as np

from nq_onnx.passes.find_layers import Layers
from nq_onnx.core.quant import denoising_delta
from nq_onnx.core.plan import Plan


def png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=72, metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(figure)
    return buffer.getvalue()


def reduction_chart(rows: list[dict]) -> bytes | None:
    import matplotlib.pyplot as plt

    data = [(r["layer"], r["reduction_pct"]) for r in rows if r["reduction_pct"] is not None]
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(data)), 3.2))
    values = [v for _, v in data]
    ax.bar(range(len(data)), values, color=["#2a7ab9" if v >= 0 else "#c0392b" for v in values])
    ax.set_xticks(range(len(data)), [n for n, _ in data], rotation=90, fontsize=6)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("output MSE reduction %")
    ax.set_title("NoisyQuant vs EasyQuant: layer output MSE reduction across depth")
    fig.tight_layout()
    return png(fig)


def group_figure(name: str, x: np.ndarray, plan: Plan, layers: Layers, weights: dict[str, tuple]) -> bytes:
    """Histograms for one noisy group: X, X + N, dq(q(X + N)), first layer's output FP32 / EasyQuant / NoisyQuant."""
    import matplotlib.pyplot as plt

    gp = plan.groups[name]
    group = next(g for g in layers.groups if g.name == name)
    noise = gp.noise if gp.noise is not None else np.zeros(x.shape[1], np.float32)
    base = gp.base_scale or gp.scale
    x_n = x + noise
    act = gp.quantizer()
    x_q = act.fake_quant(x_n, gp.scale)
    w_q, bias = weights[group.consumers[0]]
    fp32 = x @ w_q + bias  # dq(W_q): isolates the activation error the noise acts on
    easy = act.fake_quant(x, base) @ w_q + bias
    noisy = x_q @ w_q + bias + denoising_delta(noise, w_q)
    fig, axes = plt.subplots(2, 4, figsize=(14, 5.2))
    panels = [
        ("X", [(x, "X", "#555555")]),
        ("X + N", [(x_n, "X + N", "#2a7ab9")]),
        ("quantized dq(q(X + N))", [(x_q, "codes x step", "#e67e22")]),
        (
            f"{group.consumers[0]} output",
            [(fp32, "FP32", "#555555"), (easy, "EasyQuant", "#c0392b"), (noisy, "NoisyQuant", "#2a7ab9")],
        ),
    ]
    for row, log in enumerate((False, True)):
        for col, (title, series) in enumerate(panels):
            ax = axes[row, col]
            lo = min(float(s.min()) for s, _, _ in series)
            hi = max(float(s.max()) for s, _, _ in series)
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 121)
            for values, label, color in series:
                ax.hist(
                    values.ravel(),
                    bins=bins,
                    histtype="step" if len(series) > 1 else "stepfilled",
                    color=color,
                    label=label,
                    alpha=0.9 if len(series) > 1 else 0.6,
                    log=log,
                )
            ax.set_title(f"{title}{' (log)' if log else ''}", fontsize=9)
            ax.tick_params(labelsize=7)
            if len(series) > 1:
                ax.legend(fontsize=7)
    e_mse = float(np.mean((easy - fp32) ** 2))
    n_mse = float(np.mean((noisy - fp32) ** 2))
    fig.suptitle(
        f"{name}: step {gp.scale:.4g} (EasyQuant {base:.4g}), noise shift {gp.noise_shift:g} x centre, "
        f"width {gp.noise_amplitude:g} x step; layer output MSE EasyQuant {e_mse:.3g} -> NoisyQuant "
        f"{n_mse:.3g} on these tokens",
        fontsize=9,
    )
    fig.tight_layout()
    return png(fig)


def pareto_chart(front: list[dict], uniform: list[dict], chosen: dict) -> bytes:
    """Total sensitivity against average bits: the knapsack's assignment at each budget (the Pareto front PTQ-ViT
    picks from), one width for every group, and this plan's assignment."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot([p["average_bits"] for p in front], [p["sensitivity"] for p in front], marker="o", ms=3,
            label="mixed precision (knapsack at each budget)")
    ax.scatter([p["average_bits"] for p in uniform], [p["sensitivity"] for p in uniform], marker="s", color="grey",
               label="one width for all groups", zorder=3)
    ax.scatter([chosen["average_bits"]], [chosen["sensitivity"]], marker="*", s=140, color="#c0392b",
               label="this plan", zorder=4)
    ax.set_yscale("log")
    ax.set_xlabel("average bits (weights and activations, count-weighted)")
    ax.set_ylabel("summed group sensitivity")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return png(fig)
