"""Side-by-side benchmark on a real pretrained ViT: accuracy, output error, inference speed and compile cost.

    python benchmarks/run.py            # the full run (about an hour on 2 cores)
    python benchmarks/run.py --quick    # a few minutes: fewer images, fewer timing rounds, no compile curve

Rows: onnxruntime's ``quantize_static`` (all ops, Linear only, Linear only in its U8U8 form); nq-onnx MinMax,
EasyQuant and NoisyQuant at W8A8 and W6A6, NoisyQuant in its three noise modes (``paper``: the paper's noisy
bias alone; ``shift``: the per-channel mean shift alone; ``paper+shift``: both, the default) with noise seeds for
the noisy rows; the plain-QDQ model of the default NoisyQuant W8A8 plan with its noise removed (what the noise
costs at inference); NoisyQuant W6A6 at several calibration sizes (the paper's supplementary Table 2).

Everything is offline and from ``../shared``: the DINOv2-style ViT-S/14 CIFAR-10 classifier (exported here with
``nq-onnx export``), ImageNet samples for calibration and held-out output error, CIFAR-10 test images for top-1.
Writes ``benchmarks/results/<name>.json`` (machine, versions, settings, every figure) and prints the Markdown
table that ``benchmarks/table.py`` puts into the README.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CHECKPOINT = SHARED / "models" / "vit_small_patch14_dinov2.cifar10.fp16.pth"
IMAGENET = SHARED / "data" / "imagenet-samples"
CIFAR = SHARED / "data" / "cifar10-test.npz"
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work"

sys.path.insert(0, str(ROOT / "benchmarks"))
from ort_baseline import quantize_with_onnxruntime  # noqa: E402
from timing import latency_round_robin  # noqa: E402

import nq_onnx  # noqa: E402
from nq_onnx.calibration.data import Preprocess, prepare_image  # noqa: E402
from nq_onnx.calibration.evaluate import output_metrics  # noqa: E402
from nq_onnx.io.cpu import blas_record, cpu_features  # noqa: E402
from nq_onnx.sweep.evalset import first_of_each_class  # noqa: E402
from nq_onnx.inspect import inspect_model  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Settings:
    calib_size: int = 128
    calib_sizes: tuple[int, ...] = (32, 128, 1000)
    accuracy_calib_sizes: tuple[int, ...] = (32, 500)  # beside calib_size; 500 keeps the held-out 500 disjoint
    cifar_per_class: int = 200
    imagenet_eval: int = 500
    noise_seeds: tuple[int, ...] = (0, 1, 2)
    latency_rounds: dict = dataclasses.field(default_factory=lambda: {1: 40, 8: 12})
    compile_curve: bool = True
    seed: int = 0
    bits: tuple[int, ...] = (8, 6)
    onnxruntime_rows: bool = True

    @classmethod
    def ablation(cls) -> "Settings":
        """Where NoisyQuant's gain comes from, at W6A6 only (about 25 minutes on a 2-core AVX2 EPYC): EasyQuant and
        the three noise modes, one seed, 500 CIFAR-10 and 200 held-out ImageNet images, no timing."""
        return cls(calib_sizes=(), accuracy_calib_sizes=(), cifar_per_class=50, imagenet_eval=200, noise_seeds=(0,),
                   latency_rounds={}, compile_curve=False, bits=(6,), onnxruntime_rows=False)

    @classmethod
    def quick(cls) -> "Settings":
        return cls(
            calib_size=32,
            calib_sizes=(),
            accuracy_calib_sizes=(),
            cifar_per_class=20,
            imagenet_eval=100,
            noise_seeds=(0,),
            latency_rounds={1: 10, 8: 4},
            compile_curve=False,
        )


def machine() -> dict:
    import onnx_graphsurgeon

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "onnx_graphsurgeon": onnx_graphsurgeon.__version__,
        "numpy": np.__version__,
        "nq_onnx": nq_onnx.__version__,
        "cpu": cpu_features().to_dict(),
        "blas": blas(),
    }


def blas() -> dict:
    """numpy's BLAS, its kernels and the OpenBLAS settings (:func:`nq_onnx.io.cpu.blas_record`)."""
    record = blas_record()
    if record["internal_api"] is None:
        raise SystemExit("benchmarks: threadpoolctl finds no BLAS library in numpy")
    return record


def cpu_slug(kind: str) -> str:
    """A CPU kind as a file-name part: ``x86 AVX-512 VNNI`` -> ``x86_avx_512_vnni``."""
    return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")


def other_cpu_kind(path: Path, stored: dict, current: dict) -> str | None:
    """Why rows measured on ``current`` (a :func:`machine` record) must not join the results file at ``path``
    measured on ``stored``: the message naming both CPU kinds, or ``None`` when they are the same kind."""
    before, now = stored["cpu"]["kind"], current["cpu"]["kind"]
    if before != now:
        return f"benchmark: {path} was measured on {before}, this CPU is {now}; not appending (use another --name)"
    kernels = [(m.get("blas") or {}).get("architecture") for m in (stored, current)]
    if None not in kernels and kernels[0] != kernels[1]:
        return (f"benchmark: {path} was measured with numpy's {kernels[0]} BLAS kernels, this run has {kernels[1]}; "
                "not appending (use another --name)")
    return None


def plain(value):
    """JSON for the numpy scalars a results dict may hold."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def export_model(path: Path) -> Path:
    if not path.exists():
        from nq_onnx.export import export_timm

        export_timm("vit_small_patch14_dinov2", path, checkpoint=CHECKPOINT, num_classes=10, img_size=224)
    return path


def split_imagenet(calib_size: int, eval_count: int, seed: int) -> tuple[list[Path], list[Path]]:
    """A seeded choice of calibration images and, disjoint from it, the held-out evaluation images."""
    files = sorted(IMAGENET.glob("*.JPEG"))
    order = np.random.default_rng(seed).permutation(len(files))
    calib = sorted(files[i] for i in order[:calib_size])
    held = sorted(files[i] for i in order[calib_size:][:eval_count])
    return calib, held


def link_folder(files: list[Path], folder: Path) -> Path:
    """``folder`` holding links to exactly ``files``: links left there by another image set (another seed's
    calibration images) are removed, so a conversion never calibrates on images it was not given."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {path.name: path for path in files}
    for entry in folder.iterdir():
        if entry.name not in wanted or not entry.is_symlink() or entry.readlink() != wanted[entry.name]:
            entry.unlink()
    for name, path in wanted.items():
        target = folder / name
        if not target.is_symlink():
            target.symlink_to(path)
    return folder


def cifar_subset(per_class: int, pre: Preprocess) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` test images of each class, prepared like the model's training data."""
    from PIL import Image

    data = np.load(CIFAR)
    labels = data["labels"].astype(np.int64)
    index = np.array(first_of_each_class(labels, per_class), dtype=np.int64)  # the sweeps' [eval] per_class
    pixels = data["images"]  # read once: each access to an npz member decompresses all of it
    images = np.stack([prepare_image(Image.fromarray(pixels[i]), pre) for i in index])
    return images, labels[index]


def image_arrays(files: list[Path], pre: Preprocess) -> np.ndarray:
    from PIL import Image

    out = []
    for path in files:
        with Image.open(path) as image:
            out.append(prepare_image(image, pre))
    return np.stack(out)


def run_model(path: Path, inputs: np.ndarray, batch: int = 16) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: inputs[i : i + batch]})[0] for i in range(0, len(inputs), batch)])


def convert_ours(model: Path, out: Path, calib: Path, method: str, bits: int, seed: int, calib_size: int,
                 noise: str = "paper+shift") -> dict:
    config = nq_onnx.QuantConfig(method=method, w_bits=bits, a_bits=bits, seed=seed, calib_size=calib_size,
                                 noise=noise)
    start = time.perf_counter()
    result = nq_onnx.convert(model, out, calib, config, force=True, evaluate=False)
    return {
        "seconds": time.perf_counter() - start,
        "noisy_groups": result.summary.noisy_groups,
        "noise_adds": result.summary.noise_adds,
        "timings": result.summary.timings,
        "layers": layer_table(result.plan),
        "_result": result,
    }


LAYER_KINDS = (("attention", ("MatMul",)), ("qkv", ("qkv",)), ("proj", ("proj",)), ("fc1", ("fc1",)),
               ("fc2", ("fc2",)), ("head", ("head",)), ("patch_embed", ("patch_embed",)))


def layer_kind(name: str) -> str:
    """qkv, proj, fc1, fc2, head, patch_embed or attention (``Q K^T`` / ``A V``), from a timm layer name."""
    if ".MatMul" in name:
        return "attention"
    return next((kind for kind, keys in LAYER_KINDS[1:] if any(k in name.split(".") for k in keys)), "other")


def layer_table(plan) -> dict[str, dict]:
    """Per linear layer of a searched plan: its kind, the noise chosen, and its output MSE under EasyQuant and
    the final solution, on the search's fit rows and (where the noise was checked) on held-out rows."""
    out = {}
    for name, layer in plan.layers.items():
        metrics = layer.search
        if "mse_easyquant" not in metrics:
            continue
        group = next((g for g in plan.groups.values() if g.name == name), None)
        out[name] = {"kind": layer_kind(name), **metrics,
                     "noise_amplitude": group.noise_amplitude if group else 0.0,
                     "noise_shift": group.noise_shift if group else 0.0}
    return out


def our_rows(settings: Settings, bits: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(method, noise mode, seeds)`` of the nq-onnx rows at ``bits``: at W6A6 the noisy rows over the noise seeds."""
    seeds = settings.noise_seeds if bits == 6 else (settings.seed,)
    one = (settings.seed,)
    return [("minmax", "paper+shift", one), ("easyquant", "paper+shift", one), ("noisyquant", "paper+shift", seeds),
            ("noisyquant", "paper", seeds), ("noisyquant", "shift", one)]


def row_name(method: str, noise: str, bits: int, seed: int, settings: Settings) -> str:
    mode = {"paper+shift": "", "paper": "_paper", "shift": "_shift"}[noise] if method == "noisyquant" else ""
    return f"{method}{mode}_w{bits}a{bits}" + (f"_seed{seed}" if seed != settings.seed else "")


def seed_spread(models: dict, settings: Settings) -> dict:
    """Mean and spread over the noise seeds of every noisy row that was run with several."""
    out = {}
    for bits in settings.bits:
        for method, noise, seeds in our_rows(settings, bits):
            if len(seeds) < 2:
                continue
            base = row_name(method, noise, bits, settings.seed, settings)
            rows = [models[row_name(method, noise, bits, seed, settings)] for seed in seeds]
            out[base] = {
                "top1_mean": float(np.mean([m["cifar"]["top1"] for m in rows])),
                "top1_std": float(np.std([m["cifar"]["top1"] for m in rows])),
                "imagenet_mse_mean": float(np.mean([m["imagenet_heldout"]["mse"] for m in rows])),
                "imagenet_mse_std": float(np.std([m["imagenet_heldout"]["mse"] for m in rows])),
                "seeds": list(seeds),
            }
    return out


def plain_twin(result, out: Path) -> dict:
    """The plan of ``result`` with its noise removed, written as plain QDQ: the same scales, no noise Add and no
    denoised bias (what the noise costs at inference, measured against it)."""
    from nq_onnx.io.model_io import save_model_atomic
    from nq_onnx.pipeline import apply_plan

    plain = dataclasses.replace(result.plan, groups={k: dataclasses.replace(g, noise=None)
                                                     for k, g in result.plan.groups.items()})
    model, _ = apply_plan(result.float_model, result.layers, plain)
    save_model_atomic(model, out)
    return {"path": out, "kind": "nq-onnx plain QDQ of the noisyquant plan", "bits": 8}


def compile_cost(model: Path, calib: Path, calib_size: int, out: Path) -> dict:
    """Wall time and peak resident memory of one ``nq-onnx convert`` in a fresh process."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "peak_memory.py"), "convert", str(model), "-o", str(out),
           "--calib", str(calib), "--calib-size", str(calib_size), "-q", "-f", "--no-eval"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"convert failed: {proc.stderr[-2000:]}")
    peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    return {"calib_images": calib_size, "seconds": seconds, "peak_rss_mb": peak}


def ort_cost(model: Path, calib_arrays: np.ndarray, out: Path, linear_only: bool, weight_type: str = "QInt8") -> float:
    from onnxruntime.quantization import QuantType

    start = time.perf_counter()
    quantize_with_onnxruntime(model, out, calib_arrays, linear_only=linear_only, weight_type=QuantType[weight_type])
    return time.perf_counter() - start


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes: fewer images and rounds")
    parser.add_argument("--all-cifar", action="store_true", help="top-1 on all 10,000 CIFAR-10 test images")
    parser.add_argument("--ablation", action="store_true",
                        help="W6A6 rows only (EasyQuant and the three noise modes), smaller evaluation, no timing")
    parser.add_argument("--name", help="results file name (default: full or quick)")
    parser.add_argument("--only-compile", action="store_true",
                        help="re-measure only the compile-cost curve into an existing results file")
    parser.add_argument("--only-latency", action="store_true",
                        help="re-measure only the latency of the models an existing results file lists (kept in "
                             "benchmarks/work) into that file, e.g. after the machine was busy during a run")
    return parser.parse_args(argv)


def settings_of(args: argparse.Namespace) -> Settings:
    settings = Settings.quick() if args.quick else Settings.ablation() if args.ablation else Settings()
    return dataclasses.replace(settings, cifar_per_class=1000) if args.all_cifar else settings


def write_results(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results, indent=1, sort_keys=True, default=plain) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_of(args)
    for path in (CHECKPOINT, IMAGENET, CIFAR):
        if not path.exists():
            print(f"benchmark: missing {path} (the shared data must sit at {SHARED})", file=sys.stderr)
            return 2
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    existing = RESULTS / f"{args.name or ('quick' if args.quick else 'full')}.json"  # what --only-* re-measures
    if args.only_compile:
        remeasure_compile(existing, settings)
    elif args.only_latency:
        remeasure_latency(existing, settings)
    else:
        results = full_run(settings)
        name = args.name or ("quick" if args.quick else "ablation_w6a6" if args.ablation else "full")
        path = RESULTS / f"{name}.json"
        write_results(path, results)
        from table import markdown

        print(markdown(results, path.relative_to(ROOT)))
        log(f"wrote {path}")
    return 0


def remeasure_compile(path: Path, settings: Settings) -> None:
    """The compile-cost curve measured again into the results file at ``path``."""
    results = json.loads(path.read_text())
    results["compile"] = compile_curve(export_model(WORK / "vit_s14_dinov2_cifar10.onnx"), settings)
    results["compile_measured"] = time.time()
    write_results(path, results)


def remeasure_latency(path: Path, settings: Settings) -> None:
    """The latency of the models the results file at ``path`` lists measured again into it, with its targets."""
    results = json.loads(path.read_text())
    fp32 = Path(results["models"]["fp32"]["path"])
    cifar, _ = cifar_subset(settings.cifar_per_class, Preprocess.from_model(onnx.load(str(fp32))))
    results["latency"] = measure_latency({n: Path(m["path"]) for n, m in results["models"].items()}, cifar,
                                         settings, log)
    results["latency_measured"] = time.time()
    results["targets"] = targets(results)
    write_results(path, results)


def full_run(settings: Settings) -> dict:
    """Every row converted, scored, inspected and timed, and the compile curve: the results file's content."""
    results: dict = {"machine": machine(), "settings": dataclasses.asdict(settings), "started": time.time()}
    fp32 = export_model(WORK / "vit_s14_dinov2_cifar10.onnx")
    pre = Preprocess.from_model(onnx.load(str(fp32), load_external_data=False))
    calib_files, held_files = split_imagenet(settings.calib_size, settings.imagenet_eval, settings.seed)
    calib_dir = link_folder(calib_files, WORK / f"calib{settings.calib_size}")
    log(f"data: {len(calib_files)} calibration, {len(held_files)} held-out ImageNet images")
    calib_arrays = image_arrays(calib_files, pre)
    held = image_arrays(held_files, pre)
    cifar, labels = cifar_subset(settings.cifar_per_class, pre)

    models: dict[str, dict] = {"fp32": {"path": fp32, "kind": "fp32", "bits": 32}}
    models |= ort_models(fp32, calib_arrays, settings)
    models |= our_models(fp32, calib_dir, settings)
    models |= calib_size_models(fp32, settings)
    log("accuracy and output error")
    score_models(models, cifar, labels, held)
    results["seeds"] = seed_spread(models, settings)
    log("kernels")
    record_kernels(models)
    log("latency")
    results["latency"] = (measure_latency({n: m["path"] for n, m in models.items()}, cifar, settings, log)
                          if settings.latency_rounds else {})
    if settings.compile_curve:
        log("compile cost")
        results["compile"] = compile_curve(fp32, settings)
    results["models"] = {
        name: {k: (str(v) if isinstance(v, Path) else v) for k, v in entry.items()} for name, entry in models.items()
    }
    results["targets"] = targets(results)
    results["finished"] = time.time()
    return results


def ort_models(fp32: Path, calib_arrays: np.ndarray, settings: Settings) -> dict[str, dict]:
    """onnxruntime's ``quantize_static`` rows (all operators, Linear only, Linear only with uint8 weights)."""
    models = {}
    ort_rows = (("ort_all_w8a8", False, "QInt8"), ("ort_linear_w8a8", True, "QInt8"),
                ("ort_linear_w8a8_u8u8", True, "QUInt8"))
    for name, linear_only, weight_type in ort_rows if settings.onnxruntime_rows else ():
        out = WORK / f"{name}.onnx"
        seconds = ort_cost(fp32, calib_arrays, out, linear_only, weight_type)
        models[name] = {"path": out, "kind": "onnxruntime quantize_static", "bits": 8, "compile_s": seconds}
        log(f"{name}: {seconds:.1f} s")
    return models


def our_models(fp32: Path, calib_dir: Path, settings: Settings) -> dict[str, dict]:
    """The nq-onnx rows of :func:`our_rows` at every bit-width, and the noiseless twin of NoisyQuant W8A8."""
    models = {}
    for bits in settings.bits:
        for method, noise, seeds in our_rows(settings, bits):
            for seed in seeds:
                name = row_name(method, noise, bits, seed, settings)
                out = WORK / f"{name}.onnx"
                info = convert_ours(fp32, out, calib_dir, method, bits, seed, settings.calib_size, noise)
                result = info.pop("_result")
                models[name] = {"path": out, "kind": f"nq-onnx {method}", "bits": bits, "seed": seed,
                                "noise": noise if method == "noisyquant" else None, "compile_s": info["seconds"],
                                **{k: v for k, v in info.items() if k != "seconds"}}
                log(f"{name}: {info['seconds']:.1f} s")
                if name == "noisyquant_w8a8":
                    models["noisyquant_w8a8_plain"] = plain_twin(result, WORK / "noisyquant_w8a8_plain.onnx")
    return models


def calib_size_models(fp32: Path, settings: Settings) -> dict[str, dict]:
    """NoisyQuant W6A6 calibrated on each of ``settings.accuracy_calib_sizes`` images."""
    models = {}
    for size in settings.accuracy_calib_sizes:
        files, _ = split_imagenet(size, settings.imagenet_eval, settings.seed)
        folder = link_folder(files, WORK / f"calib{size}")
        name = f"noisyquant_w6a6_calib{size}"
        info = convert_ours(fp32, WORK / f"{name}.onnx", folder, "noisyquant", 6, settings.seed, size)
        info.pop("_result")
        models[name] = {"path": WORK / f"{name}.onnx", "kind": "nq-onnx noisyquant", "bits": 6, "seed": settings.seed,
                        "noise": "paper+shift", "calib_images": size, "compile_s": info["seconds"],
                        **{k: v for k, v in info.items() if k != "seconds"}}
        log(f"{name}: {info['seconds']:.1f} s")
    return models


def score_models(models: dict[str, dict], cifar: np.ndarray, labels: np.ndarray, held: np.ndarray) -> None:
    """Every model's CIFAR-10 top-1 and held-out ImageNet output error against FP32's outputs, into its entry."""
    fp32 = models["fp32"]["path"]
    reference = {"cifar": run_model(fp32, cifar), "imagenet": run_model(fp32, held)}
    for name, entry in models.items():
        cifar_out = reference["cifar"] if name == "fp32" else run_model(entry["path"], cifar)
        held_out = reference["imagenet"] if name == "fp32" else run_model(entry["path"], held)
        entry["cifar"] = output_metrics(reference["cifar"], cifar_out, labels)
        entry["imagenet_heldout"] = output_metrics(reference["imagenet"], held_out)
        log(f"{name}: top-1 {entry['cifar']['top1']:.4f}, ImageNet MSE {entry['imagenet_heldout']['mse']:.5f}")


def record_kernels(models: dict[str, dict]) -> None:
    """Each quantized model's integer kernels as :func:`nq_onnx.inspect.inspect_model` sees them, into its entry."""
    for name, entry in models.items():
        if name != "fp32":
            inspection = inspect_model(onnx.load(str(entry["path"])))
            entry["kernels"] = {
                "weight_layers": len(inspection.weight_layers),
                "weight_layers_integer": sum(k.integer for k in inspection.weight_layers),
                "counts": inspection.kernel_counts,
                "noise_adds": inspection.noise_adds,
                "can_overflow_without_vnni": len(inspection.overflow_layers),
                "weight_dtypes": inspection.weight_dtypes,
            }


TIMED = ("fp32", "ort_all_w8a8", "ort_linear_w8a8", "ort_linear_w8a8_u8u8", "easyquant_w8a8", "noisyquant_w8a8",
         "noisyquant_w8a8_plain", "noisyquant_w6a6")


def measure_latency(paths: dict[str, Path], cifar: np.ndarray, settings: Settings, log) -> dict:
    """Interleaved latency of the :data:`TIMED` models at each batch size, with ratios to FP32."""
    out = {}
    for batch, rounds in settings.latency_rounds.items():
        stats = latency_round_robin({n: paths[n] for n in TIMED}, cifar[:batch], rounds=rounds)
        for name in TIMED:
            stats[name]["ratio_to_fp32"] = stats[name]["median_ms"] / stats["fp32"]["median_ms"]
            stats[name]["throughput_ratio_to_fp32"] = stats["fp32"]["median_ms"] / stats[name]["median_ms"]
        out[f"batch{batch}"] = stats
        log(f"batch {batch}: " + ", ".join(f"{n} {s['median_ms']:.1f} ms" for n, s in stats.items()))
    return out


def compile_curve(fp32: Path, settings: Settings) -> dict:
    out: dict = {}
    for label, model in (("vit_s14_dinov2_cifar10", fp32),):
        rows = []
        for size in settings.calib_sizes:
            files, _ = split_imagenet(min(size, 1000), 0, settings.seed)
            folder = link_folder(files, WORK / f"calib{min(size, 1000)}")
            rows.append(compile_cost(model, folder, min(size, 1000), WORK / f"compile_{label}.onnx"))
        arrays = image_arrays(
            split_imagenet(settings.calib_size, 0, settings.seed)[0], Preprocess.from_model(onnx.load(str(model)))
        )
        out[label] = {
            "nq_onnx": rows,
            "onnxruntime_quantize_static_s": ort_cost(
                model, arrays, WORK / f"compile_{label}_ort.onnx", linear_only=False
            ),
            "onnxruntime_calib_images": settings.calib_size,
        }
    return out


def targets(results: dict) -> dict:
    """The project's goals that this run's rows can judge (a run without some rows judges fewer)."""
    m = results["models"]
    lat8 = results["latency"].get("batch8", {})
    fp32_top1 = m["fp32"]["cifar"]["top1"]
    out: dict = {"met": {}}
    eq6 = m.get("easyquant_w6a6")
    for key, name in (("nq", "noisyquant_w6a6"), ("paper", "noisyquant_paper_w6a6")):
        if eq6 is not None and name in m:
            out[f"w6a6_mse_ratio_{key}_over_eq"] = m[name]["imagenet_heldout"]["mse"] / eq6["imagenet_heldout"]["mse"]
            out[f"w6a6_top1_{key}_minus_eq"] = m[name]["cifar"]["top1"] - eq6["cifar"]["top1"]
    if "w6a6_mse_ratio_nq_over_eq" in out:
        out["met"]["w6a6_mse_ratio<=0.85"] = out["w6a6_mse_ratio_nq_over_eq"] <= 0.85
        out["met"]["w6a6_top1_nq>=eq"] = out["w6a6_top1_nq_minus_eq"] >= 0
    if "w6a6_mse_ratio_paper_over_eq" in out:
        out["met"]["w6a6_paper_mse<=eq"] = out["w6a6_mse_ratio_paper_over_eq"] <= 1.0
    if "noisyquant_w8a8" in m:
        out["w8a8_top1_nq_minus_fp32"] = m["noisyquant_w8a8"]["cifar"]["top1"] - fp32_top1
        out["met"]["w8a8_top1_within_0.3_of_fp32"] = out["w8a8_top1_nq_minus_fp32"] >= -0.003
        if "ort_linear_w8a8" in m:
            ort_best = max(m[n]["cifar"]["top1"] for n in m if n.startswith("ort_"))
            out["w8a8_top1_nq_minus_ort_best"] = m["noisyquant_w8a8"]["cifar"]["top1"] - ort_best
            out["met"]["w8a8_top1>=ort_best"] = out["w8a8_top1_nq_minus_ort_best"] >= 0
    if "noisyquant_w8a8" in lat8:
        out["batch8_throughput_nq_over_fp32"] = lat8["noisyquant_w8a8"]["throughput_ratio_to_fp32"]
        out["met"]["batch8_throughput>=2x_fp32"] = out["batch8_throughput_nq_over_fp32"] >= 2.0
    if "noisyquant_w8a8_plain" in lat8:  # the same plan without its noise, not EasyQuant's scales
        out["batch8_latency_nq_over_plain_qdq"] = (
            lat8["noisyquant_w8a8"]["median_ms"] / lat8["noisyquant_w8a8_plain"]["median_ms"]
        )
        out["met"]["batch8_within_5%_of_plain_qdq"] = out["batch8_latency_nq_over_plain_qdq"] <= 1.05
    ours = [e for n, e in m.items() if n.startswith(("noisyquant", "easyquant")) and "kernels" in e]
    integer = sum(e["kernels"]["weight_layers_integer"] for e in ours)
    total = sum(e["kernels"]["weight_layers"] for e in ours)
    out["integer_weight_matmuls"] = f"{integer}/{total}"
    out["met"]["all_weight_matmuls_integer"] = integer == total
    return out


if __name__ == "__main__":
    sys.exit(main())
