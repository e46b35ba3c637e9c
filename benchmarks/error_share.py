"""Where the best stack's remaining error lives: the same conversion with one kind of layer left in float.

    python benchmarks/error_share.py                    # W6A6, about 10 min on 2 cores
    python benchmarks/error_share.py --bits 4
    python benchmarks/error_share.py --stack attn       # the stack with attention reparameterization
    python benchmarks/error_share.py --stack split      # the uniform-quantizer stack with split attention maps

Converts the real ViT-S/14 (128 calibration images, seed 0) with a full stack (NoisyQuant-PTQ4ViT + reparam + GPTQ
+ bias correction; ``--stack attn`` with attention reparameterization too) once as it is and once per kind of
layer with every layer of that kind left in float
(``--exclude``: its inputs and weights unquantized; the later layers are then searched on the activations that
follow). The figure for a kind is the share of the full stack's held-out output MSE (against FP32, on ImageNet
images no conversion saw) that leaving it in float removes: what quantizing that kind costs once everything else
is as good as the stack makes it. Unlike ``bottleneck.py`` (each group alone, uniform quantizers, before the
search), this measures the searched, rounded, twin-quantized model. The shares need not add up to one: errors of
different layers interact. Writes ``benchmarks/results/error_share_w<bits>_<cpu kind>[_<stack>].json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from methods import config_of  # noqa: E402
from run import (  # noqa: E402
    RESULTS,
    WORK,
    cpu_slug,
    export_model,
    image_arrays,
    link_folder,
    machine,
    plain,
    run_model,
    split_imagenet,
)

import nq_onnx  # noqa: E402
from nq_onnx.calibration.data import Preprocess  # noqa: E402
from nq_onnx.calibration.evaluate import output_metrics  # noqa: E402

STACKS = {"gptq": "noisyquant-ptq4vit+reparam+gptq+bc", "attn": "noisyquant-ptq4vit+reparam+attn+gptq+bc",
          "asym": "noisyquant+asym+reparam+w7", "split": "noisyquant+asym+reparam+attn+gptq+bc+split+balance"}
KINDS = {"qkv": "*.attn.qkv", "Q K^T (MatMul)": "*.attn.MatMul", "A V (MatMul_1)": "*.attn.MatMul_1",
         "proj": "*.attn.proj", "fc1": "*.mlp.fc1", "fc2": "*.mlp.fc2", "head": "head"}
BEGIN, END = "<!-- error-share:begin -->", "<!-- error-share:end -->"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, default=6, help="WnAn of the stack (default 6)")
    parser.add_argument("--stack", choices=sorted(STACKS), default="gptq",
                        help="gptq: NoisyQuant-PTQ4ViT + reparam + GPTQ + bias correction (default); attn: with "
                             "attention reparameterization too; asym: NoisyQuant, asymmetric activations, reparam, "
                             "7-bit weights; split: NoisyQuant on uniform quantizers, asymmetric activations, both "
                             "reparameterizations, GPTQ, bias correction, split attention maps, channel balancing")
    parser.add_argument("--imagenet-eval", type=int, default=200, help="held-out ImageNet images (200)")
    args = parser.parse_args(argv)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    WORK.mkdir(parents=True, exist_ok=True)
    fp32 = export_model(WORK / "vit_s14_dinov2_cifar10.onnx")
    pre = Preprocess.from_model(onnx.load(str(fp32), load_external_data=False))
    calib_files, held_files = split_imagenet(128, args.imagenet_eval, 0)
    calib = link_folder(calib_files, WORK / "calib128")
    held = image_arrays(held_files, pre)
    reference = run_model(fp32, held)
    row = STACKS[args.stack]
    base = config_of(row, args.bits, 128, 0)
    data: dict = {"machine": machine(), "settings": {"row": row, "bits": args.bits, "calib_size": 128, "seed": 0,
                                                      "imagenet_eval": args.imagenet_eval}, "rows": {}}
    for kind, pattern in {"none": None, **KINDS}.items():
        config = base if pattern is None else dataclasses.replace(base, exclude=(pattern,))
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "q.onnx"
            nq_onnx.convert(fp32, out, calib, config, force=True, evaluate=False)
            seconds = time.perf_counter() - start
            metrics = output_metrics(reference, run_model(out, held))
        data["rows"][kind] = {"exclude": pattern, "convert_s": seconds, "imagenet_heldout": metrics}
        log(f"{kind}: held-out MSE {metrics['mse']:.5f}, convert {seconds:.0f} s")
    suffix = "" if args.stack == "gptq" else f"_{args.stack}"
    path = RESULTS / f"error_share_w{args.bits}_{cpu_slug(data['machine']['cpu']['kind'])}{suffix}.json"
    path.write_text(json.dumps(data, indent=1, sort_keys=True, default=plain) + "\n")
    print(markdown(data, path.relative_to(ROOT)))
    return 0


def markdown(data: dict, source) -> str:
    """The README table: per kind left in float, the held-out MSE and the share of the full stack's it removes."""
    rows, bits = data["rows"], data["settings"]["bits"]
    whole = rows["none"]["imagenet_heldout"]["mse"]
    lines = ["| left in float | held-out MSE | share of the full stack's error removed |", "|---|---|---|",
             f"| nothing (the full stack) | {whole:.4f} | |"]
    for kind, e in sorted(((k, e) for k, e in rows.items() if k != "none"),
                          key=lambda kv: kv[1]["imagenet_heldout"]["mse"]):
        mse = e["imagenet_heldout"]["mse"]
        lines.append(f"| {kind} (`{e['exclude']}`) | {mse:.4f} | {round(100 * (1 - mse / whole))} % |")
    from table import ROW_LABEL, blas_line, cpu_line, row_label, weight_bits
    from table_tradeoff import row_label as words

    row = data["settings"]["row"]  # the methods table's label where it has one, else every option in words
    label = row_label(row) if row in ROW_LABEL or weight_bits(row.split("+")) else words(row)
    return "\n".join(lines) + (
        f"\n\nW{bits}A{bits}, {label}, 128 calibration images (seed 0); "
        f"output MSE against FP32 on {data['settings']['imagenet_eval']} held-out ImageNet images. "
        f"{cpu_line(data)} {blas_line(data)} Source: `{source}` (`python benchmarks/error_share.py`).")


if __name__ == "__main__":
    sys.exit(main())
