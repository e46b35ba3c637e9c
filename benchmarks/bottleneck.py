"""Which layers hold a narrow width back: each group's output sensitivity, summed by the layer it feeds.

    python benchmarks/bottleneck.py     # one conversion of the real ViT-S/14, about 2 min on 2 cores

Converts the real ViT-S/14 (128 calibration images, seed 0) with NoisyQuant-PTQ4ViT + reparam under a bits budget, which
makes the planner measure every activation group's sensitivity (:mod:`nq_onnx.search.mixed`: the model output's MSE
against FP32 with that group alone quantized at 4, 5, 6 and 8 bits, its weights MinMax and its input at the clipped
uniform step, on the first calibration image) and keep it in the plan. The figures are those sensitivities summed over
the groups that feed each kind of layer (``fc2``: the GELU outputs, ``MatMul_1``: the attention maps and ``V``, ...),
the width at which it hurts being the question: the uniform quantizers here are not the twin-uniform ones the PTQ4ViT
stack then uses, so this shows what a uniform quantizer leaves to the twin ones and to everything else. Writes
``benchmarks/results/bottleneck_<cpu kind>.json``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from run import RESULTS, WORK, cpu_slug, export_model, link_folder, machine, plain, split_imagenet  # noqa: E402

import nq_onnx  # noqa: E402

BEGIN, END = "<!-- bottleneck:begin -->", "<!-- bottleneck:end -->"


def by_kind(result) -> dict[str, dict[int, float]]:
    """Each group's sensitivity at every width, summed over the groups by the (last name part of the) layers they
    feed."""
    out: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for group in result.layers.groups:
        key = ",".join(sorted({c.split(".")[-1] for c in group.consumers}))
        for bits, value in result.plan.groups[group.name].precision.sensitivity.items():
            out[key][bits] += value
    return {k: dict(v) for k, v in out.items()}


def markdown(data: dict, source) -> str:
    rows = sorted(data["kinds"].items(), key=lambda kv: -kv[1]["4"])
    widths = sorted(next(iter(data["kinds"].values())), key=int)
    lines = ["| groups feeding | " + " | ".join(f"{b} bits" for b in widths) + " |", "|---" * (len(widths) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(f"{v[b]:.4f}" for b in widths) + " |" for k, v in rows]
    cpu = data["machine"]["cpu"]
    return "\n".join(lines) + (
        f"\n\nSum over the groups of the model output's MSE against FP32 with that group alone quantized at each "
        f"width (uniform quantizers; {data['settings']['method']} + reparam, {data['settings']['calib_size']} "
        f"calibration images, sensitivities on 1). CPU: {cpu['model']}, {cpu['kind']}. Source: `{source}` "
        "(`python benchmarks/bottleneck.py`).")


def main() -> int:
    fp32 = export_model(WORK / "vit_s14_dinov2_cifar10.onnx")
    calib = link_folder(split_imagenet(128, 0, 0)[0], WORK / "calib128")
    config = nq_onnx.QuantConfig(method="noisyquant-ptq4vit", reparam=True, bits_budget=4.5, calib_size=128, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        result = nq_onnx.convert(fp32, Path(tmp) / "q.onnx", calib, config, force=True, evaluate=False)
    data = {"machine": machine(), "settings": {"method": config.method.value, "reparam": True,
                                               "calib_size": config.calib_size, "mixed_images": config.mixed_images},
            "kinds": {k: {str(b): v for b, v in sorted(w.items())} for k, w in by_kind(result).items()}}
    path = RESULTS / f"bottleneck_{cpu_slug(data['machine']['cpu']['kind'])}.json"
    path.write_text(json.dumps(data, indent=1, sort_keys=True, default=plain) + "\n")
    print(markdown(data, path.relative_to(ROOT)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
