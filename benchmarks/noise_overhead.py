"""What the noise costs at inference: NoisyQuant with every noise as an explicit Add (before folding) and with the
noise folded into preceding biases (after), against the plain-QDQ model of the same scales without noise.

    python benchmarks/noise_overhead.py     # after benchmarks/run.py (reuses its exported model and calibration)

Writes ``benchmarks/results/noise_overhead.json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from run import RESULTS, WORK, machine  # noqa: E402
from timing import latency_round_robin  # noqa: E402

import nq_onnx  # noqa: E402
from nq_onnx.calibration.data import load_dataset  # noqa: E402
from nq_onnx.inspect import inspect_model  # noqa: E402
from nq_onnx.io.model_io import load_model, save_model_atomic  # noqa: E402
from nq_onnx.pipeline import apply_plan  # noqa: E402


def main() -> int:
    fp32 = WORK / "vit_s14_dinov2_cifar10.onnx"
    calib = WORK / "calib128"
    result = nq_onnx.convert(fp32, WORK / "overhead_folded.onnx", calib,
                             nq_onnx.QuantConfig(calib_size=128), force=True, evaluate=False)
    variants = {"folded": WORK / "overhead_folded.onnx"}
    explicit, _ = apply_plan(result.float_model, result.layers, result.plan, fold_noise=False)
    save_model_atomic(explicit, WORK / "overhead_explicit.onnx")
    variants["explicit_adds"] = WORK / "overhead_explicit.onnx"
    plain = dataclasses.replace(result.plan, groups={k: dataclasses.replace(g, noise=None)
                                                     for k, g in result.plan.groups.items()})
    plain_model, _ = apply_plan(result.float_model, result.layers, plain)
    save_model_atomic(plain_model, WORK / "overhead_plain.onnx")
    variants["plain_qdq"] = WORK / "overhead_plain.onnx"
    model, _ = load_model(fp32)
    batch = next(load_dataset(calib, model, limit=8, seed=0).batches(8))[model.graph.input[0].name]
    out: dict = {"machine": machine(), "models": {}}
    for name, path in variants.items():
        inspection = inspect_model(onnx.load(str(path)))
        out["models"][name] = {"noise_adds": inspection.noise_adds, "kernels": inspection.kernel_counts}
    for size, rounds in ((1, 200), (8, 30)):  # batch 1 moves by several percent between runs at 40 rounds
        stats = latency_round_robin(variants, batch[:size], rounds=rounds)
        for name in variants:
            stats[name]["ratio_to_plain_qdq"] = stats[name]["median_ms"] / stats["plain_qdq"]["median_ms"]
        out[f"batch{size}"] = stats
        print(f"batch {size}: " + ", ".join(f"{n} {s['median_ms']:.1f} ms ({s['ratio_to_plain_qdq']:.3f}x)"
                                             for n, s in stats.items()))
    print({n: m["noise_adds"] for n, m in out["models"].items()})
    (RESULTS / "noise_overhead.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
