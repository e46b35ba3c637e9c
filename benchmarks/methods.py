"""Methods benchmark on the real ViT-S/14: EasyQuant / NoisyQuant with LayerNorm reparameterization, GPTQ rounding
and bias correction, each row converted and evaluated in the same run on the same images.

    python benchmarks/methods.py                       # W8A8, W6A6, W4A4; every row; 2,000 CIFAR-10 images
    python benchmarks/methods.py --bits 6 --rows easyquant,noisyquant,noisyquant+reparam --cifar-per-class 50
    python benchmarks/methods.py --set 6=easyquant,all --set 8=noisyquant,all   # other rows per bit-width
    python benchmarks/methods.py --name mixed --set 8=noisyquant,noisyquant+budget6.0 --set 6=noisyquant
    python benchmarks/methods.py --append --repeat 3 --set 8=noisyquant-ptq4vit,all   # convert time: median of 3

Rows are named ``<method>[+reparam][+gptq][+bc][+budget<B>]``; ``all`` is ``noisyquant+reparam+gptq+bc``;
``budget6.0`` is mixed precision at an average of 6.0 bits (such rows are given as bit-width 8). Each row records
top-1 on the first ``--cifar-per-class`` CIFAR-10 test images of every class, the output MSE against FP32 on
held-out ImageNet images (disjoint from the 128 calibration images), convert time, the groups reparameterized,
and the CPU it ran on. Writes ``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from run import (  # noqa: E402
    CHECKPOINT,
    CIFAR,
    IMAGENET,
    RESULTS,
    WORK,
    cifar_subset,
    export_model,
    image_arrays,
    layer_table,
    link_folder,
    machine,
    other_cpu_kind,
    plain,
    run_model,
    split_imagenet,
)
from table import weight_bits  # noqa: E402

import nq_onnx  # noqa: E402
from nq_onnx.techniques.split_softmax import SplitSoftmaxSettings  # noqa: E402
from nq_onnx.calibration.data import Preprocess  # noqa: E402
from nq_onnx.calibration.evaluate import output_metrics  # noqa: E402
from nq_onnx.core.config import MixedSensitivity  # noqa: E402
from nq_onnx.inspect import inspect_model  # noqa: E402

ROWS = ("easyquant", "noisyquant", "easyquant+reparam", "noisyquant+reparam", "easyquant+gptq", "easyquant+bc",
        "all", "ptq4vit", "noisyquant-ptq4vit")


SENSITIVITIES = tuple(m.value for m in MixedSensitivity)  # row options naming a mixed-precision sensitivity


def config_of(row: str, bits: int, calib_size: int, seed: int) -> nq_onnx.QuantConfig:
    if row == "default":  # the library's defaults, as `nq-onnx convert` with no options writes them
        return nq_onnx.QuantConfig(seed=seed, calib_size=calib_size)
    if row.startswith("default+"):  # the defaults with a search sample of another size (search<N>, held<N>)
        return nq_onnx.QuantConfig(seed=seed, calib_size=calib_size, search=nq_onnx.SearchConfig(**sample_of(row)))
    return _row_config(row, bits, calib_size, seed)


SAMPLE = (("search_images", "search"), ("holdout_images", "held"))  # SearchConfig field, row option prefix


def sample_of(row: str) -> dict[str, int]:
    """The search sample a row's ``search<N>`` / ``held<N>`` options set (SearchConfig fields); a ``default+`` row
    takes no other option (``SystemExit`` naming the row)."""
    out, parts = {}, row.split("+")
    for key, prefix in SAMPLE:
        out |= {key: int(p[len(prefix):]) for p in parts if p.startswith(prefix) and p[len(prefix):].isdigit()}
    if parts[0] == "default" and len(parts) - 1 != len(out):
        raise SystemExit(f"benchmark: row {row!r}: a default+ row takes search<N> and held<N> only")
    return out


def _row_config(row: str, bits: int, calib_size: int, seed: int) -> nq_onnx.QuantConfig:
    """A row is ``method+option+...``: ``reparam``, ``attn`` (attention reparameterization), ``gptq`` / ``gptq-act``
    (weight rounding), ``bc`` (bias correction), ``pearson`` (PTQ-ViT's similarity objective), ``rank`` (its ranking
    loss, gamma 0.1), ``budget<B>`` (mixed precision at an average of ``B`` bits: give such rows as bit-width 8),
    ``joint`` / ``nuclear`` / ``searched`` (that mixed-precision sensitivity instead of the default), ``images<N>``
    (sensitivities on N images; without it a row's sensitivities are on 1 image, as the results files name such rows,
    not the library's default of 4), ``fit<N>`` (the searches fit on N images, 128 token rows each: default 8), ``w<N>``
    (weights at N bits, activations at the row's bits), ``search<N>`` / ``held<N>`` (the searches fit on N images,
    or check on N held-out images, with the default number of token rows; ``default+search<N>+held<M>``: the
    defaults with that sample), ``asym`` (asymmetric activations), ``sym`` (symmetric ones),
    ``vnni`` / ``avx2`` / ``arm64`` / ``gpu`` (that target; without one: portable), ``floatattn`` (the attention
    matmuls ``Q K^T`` and ``A V`` left in float), ``floatav`` (``A V`` alone), ``split`` (the attention maps split in
    two ranges, ``--split-softmax``), ``balance`` / ``balance<ALPHA>`` (channel balancing, on in no other row: at
    strength 0.25 or ``ALPHA``); ``all`` is NoisyQuant with reparam, GPTQ and bias correction."""
    parts = "noisyquant+reparam+gptq+bc".split("+") if row == "all" else row.split("+")
    budget = next((float(p[len("budget"):]) for p in parts if p.startswith("budget")), None)
    images = next((int(p[3:]) for p in parts if p.startswith("fit")), None)  # search images (128 rows each)
    fit = ({"search_images": images, "tokens": 128 * images} if images else {}) | sample_of(row)
    targets = {"vnni": "x86-vnni", "avx2": "x86-avx2", "arm64": "arm64", "gpu": "gpu"}
    target = next((targets[p] for p in parts if p in targets), "portable")
    activations = "asymmetric" if "asym" in parts else "symmetric"
    return nq_onnx.QuantConfig(method=parts[0], w_bits=weight_bits(parts) or bits, a_bits=bits, seed=seed,
                               target=target, activations=activations,
                               quantize_attention_matmuls="floatattn" not in parts,
                               attention_probabilities="floatav" not in parts,
                               calib_size=calib_size,
                               reparam="reparam" in parts, reparam_attention="attn" in parts,
                               weight_rounding=next((p for p in parts if p in ("gptq", "gptq-act")), "nearest"),
                               bias_correction="bc" in parts, bits_budget=budget,
                               techniques=(SplitSoftmaxSettings(split_softmax=True),) if "split" in parts else (),
                               balance_channels=any(p.startswith("balance") for p in parts),
                               balance_alpha=next((float(p[len("balance"):]) for p in parts
                                                   if p.startswith("balance") and p[len("balance"):]),
                                                  nq_onnx.QuantConfig.balance_alpha),
                               mixed_sensitivity=next((p for p in parts if p in SENSITIVITIES),
                                                      nq_onnx.QuantConfig.mixed_sensitivity),
                               mixed_images=next((int(p[6:]) for p in parts if p.startswith("images")), 1),
                               search=nq_onnx.SearchConfig(objective="pearson" if "pearson" in parts else "cosine",
                                                           ranking_loss=0.1 if "rank" in parts else 0.0, **fit))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", default="8,6,4", help="comma-separated bit-widths (WnAn), default 8,6,4")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default: {','.join(ROWS)})")
    parser.add_argument("--set", action="append", default=[], metavar="BITS=ROWS",
                        help="rows for one bit-width (repeatable; replaces --bits and --rows)")
    parser.add_argument("--cifar-per-class", type=int, default=200, help="CIFAR-10 test images per class (200)")
    parser.add_argument("--imagenet-eval", type=int, default=200, help="held-out ImageNet images (200)")
    parser.add_argument("--calib-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1,
                        help="conversions per row (default 1); the row keeps the median convert time, and every "
                             "repeat must give the same model bytes")
    parser.add_argument("--name", default="methods", help="results file name (default: methods)")
    parser.add_argument("--append", action="store_true",
                        help="add (or replace) rows in an existing results file with the same settings: the same "
                             "calibration and evaluation images, on the same kind of CPU; each row records the "
                             "invocation it came from")
    parser.add_argument("--latency-rounds", type=int, default=0,
                        help="after the rows, time every row's model and FP32 at batch 8, interleaved, this many "
                             "rounds (default 0: no timing)")
    parser.add_argument("--only-latency", action="store_true",
                        help="convert nothing: time the models of the rows already in the results file (kept in "
                             "benchmarks/work) and FP32, --latency-rounds rounds (default 10), into that file")
    return parser.parse_args(argv)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_results(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results, indent=1, sort_keys=True, default=plain) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for path in (CHECKPOINT, IMAGENET, CIFAR):
        if not path.exists():
            print(f"benchmark: missing {path}", file=sys.stderr)
            return 2
    WORK.mkdir(parents=True, exist_ok=True)
    fp32 = export_model(WORK / "vit_s14_dinov2_cifar10.onnx")
    path = RESULTS / f"{args.name}.json"
    if args.only_latency:
        results = json.loads(path.read_text())
        pre = Preprocess.from_model(onnx.load(str(fp32), load_external_data=False))
        time_rows(results, fp32, cifar_subset(1, pre)[0], args.latency_rounds or 10, log)
        write_results(path, results)
        return 0
    data = Evaluation.load(fp32, args)
    results = start_results(args, path, data)
    if results is None:
        return 2
    for bits, row in row_plan(args):
        name = f"{row}_w{bits}a{bits}"
        out = WORK / f"methods_{name}.onnx"
        if row == ORT_ROW:
            results["rows"][name] = ort_row(fp32, out, data.calib_files, data.pre, data.reference, data.cifar,
                                            data.held, data.labels)
            results["rows"][name]["invocation"] = results["started"]
            continue
        entry = convert_row(row, bits, out, args, data)
        if entry is None:
            print(f"benchmark: {name} gave different model bytes on repeat", file=sys.stderr)
            return 1
        results["rows"][name] = entry | {"invocation": results["started"]}
        log(f"{name}: top-1 {entry['cifar']['top1']:.4f}, ImageNet MSE {entry['imagenet_heldout']['mse']:.5f}, "
            f"convert {entry['convert_s']:.0f} s")
        results["finished"] = time.time()
        write_results(path, results)
    if args.latency_rounds:
        time_rows(results, fp32, data.cifar, args.latency_rounds, log)
        write_results(path, results)
    log(f"wrote {path}")
    return 0


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The images every row is converted and scored on, and FP32's outputs on them."""

    fp32: Path
    pre: Preprocess
    calib_files: list[Path]
    calib: Path
    held: np.ndarray
    cifar: np.ndarray
    labels: np.ndarray
    reference: dict[str, np.ndarray]

    @classmethod
    def load(cls, fp32: Path, args: argparse.Namespace) -> "Evaluation":
        """``--calib-size`` calibration images and, disjoint from them, ``--imagenet-eval`` held-out ones (seeded by
        ``--seed``); the first ``--cifar-per-class`` CIFAR-10 test images of every class."""
        pre = Preprocess.from_model(onnx.load(str(fp32), load_external_data=False))
        calib_files, held_files = split_imagenet(args.calib_size, args.imagenet_eval, args.seed)
        calib = link_folder(calib_files, WORK / f"calib{args.calib_size}")
        held = image_arrays(held_files, pre)
        cifar, labels = cifar_subset(args.cifar_per_class, pre)
        reference = {"cifar": run_model(fp32, cifar), "imagenet": run_model(fp32, held)}
        return cls(fp32, pre, calib_files, calib, held, cifar, labels, reference)


def start_results(args: argparse.Namespace, path: Path, data: Evaluation) -> dict | None:
    """This run's results: new, or with ``--append`` the rows (and latency) of the file at ``path``, which must have
    the same settings and CPU kind (``None``, with the reason on stderr, where it has not)."""
    per_run = ("bits", "rows", "set", "append", "latency_rounds", "only_latency", "repeat")
    settings = {k: v for k, v in vars(args).items() if k not in per_run}
    results: dict = {"machine": machine(), "settings": settings, "started": time.time(),
                     "fp32": {"cifar": output_metrics(data.reference["cifar"], data.reference["cifar"], data.labels)},
                     "rows": {}}
    if args.append and path.exists():
        previous = json.loads(path.read_text())
        kept = {k: v for k, v in previous["settings"].items() if k in settings}
        if kept != settings:
            print(f"benchmark: {path} has other settings ({kept}); not appending", file=sys.stderr)
            return None
        mismatch = other_cpu_kind(path, previous["machine"], results["machine"])
        if mismatch:
            print(mismatch, file=sys.stderr)
            return None
        results["rows"] = previous["rows"]
        results["invocations"] = previous.get("invocations", [previous["started"]])
        results |= {k: v for k, v in previous.items() if k.startswith("latency")}  # timed rows keep their times
    results.setdefault("invocations", []).append(results["started"])
    return results


def row_plan(args: argparse.Namespace) -> list[tuple[int, str]]:
    """``(bits, row)`` in the order to convert: each ``--set BITS=ROWS``, else ``--rows`` at each of ``--bits``."""
    plan = [(int(b), r.split(",")) for b, r in (item.split("=") for item in args.set)] or \
        [(int(b), args.rows.split(",")) for b in args.bits.split(",")]
    return [(bits, row) for bits, rows in plan for row in rows]


def convert_row(row: str, bits: int, out: Path, args: argparse.Namespace, data: Evaluation) -> dict | None:
    """Row ``row`` at ``bits`` converted ``--repeat`` times (its median convert time kept) and scored; ``None`` where
    the repeats gave different model bytes."""
    times, digests = [], set()
    for _ in range(max(1, args.repeat)):
        start = time.perf_counter()
        result = nq_onnx.convert(data.fp32, out, data.calib, config_of(row, bits, args.calib_size, args.seed),
                                 force=True, evaluate=False)
        times.append(time.perf_counter() - start)
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    if len(digests) != 1:
        return None
    write_noiseless(result, out.with_name(f"{out.stem}_nonoise.onnx"))
    inspection = inspect_model(onnx.load(str(out)))
    return {
        "row": row, "bits": bits, "w_bits": result.plan.config.w_bits, "convert_s": float(np.median(times)),
        "convert_s_runs": times,
        "timings": result.summary.timings,
        "reparam_groups": result.summary.reparam_groups, "noisy_groups": result.summary.noisy_groups,
        "average_bits": result.summary.average_bits or float(bits),
        "bits_groups": {str(b): n for b, n in result.summary.bits_groups.items()},
        "cifar": output_metrics(data.reference["cifar"], run_model(out, data.cifar), data.labels),
        "imagenet_heldout": output_metrics(data.reference["imagenet"], run_model(out, data.held)),
        "weight_layers_integer": f"{sum(k.integer for k in inspection.weight_layers)}/"
                                 f"{len(inspection.weight_layers)}",
        "layers": layer_table(result.plan),
    }


ORT_ROW = "ort-static"  # onnxruntime's quantize_static: QDQ, per-channel int8 weights, uint8 activations, MinMax


def ort_row(fp32: Path, out: Path, calib_files: list[Path], pre, reference: dict, cifar, held, labels) -> dict:
    """The row of onnxruntime's own ``quantize_static`` with its default operator set, on the same calibration
    images (what a user of onnxruntime gets without nq-onnx)."""
    from ort_baseline import quantize_with_onnxruntime

    start = time.perf_counter()
    quantize_with_onnxruntime(fp32, out, image_arrays(calib_files, pre), linear_only=False)
    seconds = time.perf_counter() - start
    return {"row": ORT_ROW, "bits": 8, "w_bits": 8, "convert_s": seconds, "convert_s_runs": [seconds],
            "average_bits": 8.0, "cifar": output_metrics(reference["cifar"], run_model(out, cifar), labels),
            "imagenet_heldout": output_metrics(reference["imagenet"], run_model(out, held)),
            "weight_layers_integer": "-", "layers": {}}


def write_noiseless(result, path: Path) -> None:
    """The same plan without its noise vectors (``N = 0``, the same steps and weights), for NoisyQuant's own
    latency cost; nothing where the plan has no noise (and a stale file from an earlier run is removed)."""
    from nq_onnx.io.model_io import save_model_atomic
    from nq_onnx.pipeline import apply_plan

    path.unlink(missing_ok=True)
    if not any(g.noise is not None for g in result.plan.groups.values()):
        return
    groups = {k: dataclasses.replace(g, noise=None) for k, g in result.plan.groups.items()}
    model, _ = apply_plan(result.float_model, result.layers, dataclasses.replace(result.plan, groups=groups))
    save_model_atomic(model, path)


def time_rows(results: dict, fp32: Path, images: np.ndarray, rounds: int, log) -> None:
    """Batch-8 latency of every row's model (and ``<row>/no-noise``: the same plan without its noise) and FP32,
    interleaved, into ``results["latency_batch8"]`` with the CPU it was measured on (a row whose model is no longer
    in ``benchmarks/work`` is left out)."""
    from timing import latency_round_robin

    paths = {"fp32": fp32}
    for name in results["rows"]:
        for key, file in ((name, f"methods_{name}.onnx"), (f"{name}/no-noise", f"methods_{name}_nonoise.onnx")):
            if (WORK / file).exists():
                paths[key] = WORK / file
    stats = latency_round_robin(paths, images[:8], rounds=rounds)
    for entry in stats.values():
        entry["ratio_to_fp32"] = entry["median_ms"] / stats["fp32"]["median_ms"]
    results["latency_batch8"] = stats
    results["latency_machine"] = machine()
    results["latency_measured"] = time.time()
    log("batch 8: " + ", ".join(f"{n} {s['median_ms']:.1f} ms" for n, s in stats.items()))


if __name__ == "__main__":
    sys.exit(main())
