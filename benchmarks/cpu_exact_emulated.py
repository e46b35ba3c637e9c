"""Integer kernels on an x86 CPU without VNNI, emulated: each quantized matmul's fused kernel against its QDQ
arithmetic (``cpu_exact.layer_fidelity``) with onnxruntime running under ``qemu-x86_64 -cpu Haswell`` (AVX2, no
AVX-512, no VNNI), where MLAS picks its U8S8 AVX2 kernel and its saturating 16-bit pair sums.

    apt-get install qemu-user                                    # once
    python benchmarks/cpu_exact_emulated.py MODEL.onnx [MODEL.onnx ...] --images 2

QEMU emulates the CPU's instructions, ``cpuid`` included, so onnxruntime dispatches as on a Haswell; ``/proc/cpuinfo``
still shows the host's flags, which is why the emulated CPU is recorded from the command line, not from the file.
Emulation is slow (about a minute per model on 2 images of ViT-S/14): it checks arithmetic, never speed. Writes
``benchmarks/results/cpu_exact_emulated_<cpu>.json``: per model its weight storage, the worst layer's SQNR of kernel
against graph (float rounding alone leaves it above 100 dB; a saturated pair sum drops it to a few dB) and every
layer's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402


def child(model: str, images: str, out: str) -> int:
    """Under emulation: the per-layer fidelity of one model (imported here: run by the emulated interpreter)."""
    from cpu_exact import layer_fidelity, kernel_report

    report = layer_fidelity(Path(model), np.load(images)) | kernel_report(Path(model))
    Path(out).write_text(json.dumps(report, default=run.plain))
    return 0


def emulated(model: Path, images: Path, cpu: str, qemu: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "fidelity.json"
        started = time.perf_counter()
        done = subprocess.run([qemu, "-cpu", cpu, sys.executable, __file__, "--child", str(model), str(images),
                               str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{model.name} under qemu -cpu {cpu} failed: {done.stderr.strip().splitlines()[-1:]}")
        return json.loads(out.read_text()) | {"emulated_s": time.perf_counter() - started}


def markdown(data: dict, source: Path) -> str:
    """Per model: its weight storage, the layers whose codes can saturate, and its kernels against its graph under
    the emulated CPU."""
    host = data["host"]
    lines = ["| model | weights | layers that can saturate without VNNI | kernel SQNR dB, worst layer | "
             "layers below 60 dB |", "|---|---|---|---|---|"]
    for name, row in data["models"].items():
        dtypes = ", ".join(f"{n} {d}" for d, n in sorted(row["weight_dtypes"].items()))
        lines.append(f"| `{name}` | {dtypes} | {row['can_overflow_without_vnni']}/{row['weight_layers']} | "
                     f"{row['worst_db']:.1f} | {row['below_60db']}/{row['layers']} |")
    return ("\n".join(lines) + f"\n\nonnxruntime {host['onnxruntime']} run under `qemu-x86_64 -cpu "
            f"{data['emulated_cpu']}` ({data['qemu']}; AVX2 without AVX-512 or VNNI, so MLAS runs its U8S8 AVX2 "
            f"kernel), on a host {host['cpu']['model']} ({host['cpu']['kind']}); every quantized matmul cut out and "
            f"fed the activations it sees on {data['images']} held-out ImageNet images. Source: `{source}`.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", type=Path, help="quantized models of the real ViT-S/14")
    parser.add_argument("--images", type=int, default=2, help="held-out ImageNet images fed to each model (2)")
    parser.add_argument("--cpu", default="Haswell", help="QEMU's CPU model (Haswell: AVX2 without VNNI)")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "IMAGES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child)
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        raise SystemExit("qemu-x86_64 not found: apt-get install qemu-user")
    version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    from nq_onnx.calibration.data import Preprocess

    _, held_out = run.split_imagenet(128, args.images, 0)
    results = {"host": run.machine(), "qemu": version, "emulated_cpu": args.cpu, "images": args.images,
               "models": {}}
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models:
            images = Path(folder) / "images.npy"
            pre = Preprocess.from_model(onnx.load(str(model), load_external_data=False))
            np.save(images, run.image_arrays(held_out, pre))
            results["models"][model.name] = emulated(model, images, args.cpu, qemu)
            row = results["models"][model.name]
            print(f"{model.name}: {row['weight_dtypes']}, worst layer {row['worst_db']:.1f} dB "
                  f"({row['worst_layer']}), {row['below_60db']} layers below 60 dB", flush=True)
    path = run.RESULTS / f"cpu_exact_emulated_{run.cpu_slug(args.cpu)}.json"
    path.write_text(json.dumps(results, indent=1, sort_keys=True, default=run.plain) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
