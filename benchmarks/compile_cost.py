"""Compile cost of ``convert``: where the seconds go, peak memory, and what each speed-up costs in accuracy.

    python benchmarks/compile_cost.py                          # the default rows (below), ~25 min on 2 cores
    python benchmarks/compile_cost.py --before ../old-checkout # adds the same conversions by another checkout
    python benchmarks/compile_cost.py --rows nq_w8a8,vit_b16 --append --repeat 3

Each conversion runs alone in a fresh process (this script with ``--child``), which reports the summary's timing
breakdown (the stages, search parts and linear-search phases ``convert --profile`` writes) and its
own peak resident memory (``VmHWM``); with ``--repeat N`` each row converts N times, each in its own process, and
the row keeps the run of median wall time (all wall times are recorded; the runs must give the same model bytes).
The repeats run round-robin over the rows (row A, row B, row A, ...), so a drift of the machine's speed falls on
every row alike. Rows that convert the real ViT-S/14 are then scored on images no conversion saw: output MSE
against FP32 on held-out ImageNet images and top-1 on CIFAR-10, so that a speed-up which changes the search's
choices is judged on held-out data. ``--before DIR`` converts every requested row that uses the checkout's defaults
with the nq-onnx of another checkout too (e.g. a ``git worktree`` of an older commit; rows ``<label>:<row>``), for
the speed-up factor of a change and what it does to held-out accuracy. The machine record names numpy's BLAS
kernels. Writes ``benchmarks/results/compile_cost.json`` (``--name``: another file, e.g. one per CPU kind;
``--append`` refuses a file measured on another kind of CPU or with other BLAS kernels).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent

# name: (model, method, bits, SearchConfig fields ({}: the checkout's defaults), calibration images, scored)
ROWS = {
    "nq_w8a8": ("vit_s14", "noisyquant", 8, {}, 128, True),
    "nq_w8a8_exact": ("vit_s14", "noisyquant", 8, {"screen_tokens": 0}, 128, True),
    "nq_w8a8_grid3": ("vit_s14", "noisyquant", 8, {"grid_stride": 3}, 128, True),
    "nq_w8a8_uniform_rows": ("vit_s14", "noisyquant", 8, {"read_token_share": 0.0}, 128, True),
    "nq_w6a6": ("vit_s14", "noisyquant", 6, {}, 128, True),
    "nq_w6a6_exact": ("vit_s14", "noisyquant", 6, {"screen_tokens": 0}, 128, True),
    "nq_w6a6_grid3": ("vit_s14", "noisyquant", 6, {"grid_stride": 3}, 128, True),
    "nq_w6a6_uniform_rows": ("vit_s14", "noisyquant", 6, {"read_token_share": 0.0}, 128, True),
    "nq_w8a8_tokens512": ("vit_s14", "noisyquant", 8, {"tokens": 512}, 128, True),
    "nq_w6a6_tokens512": ("vit_s14", "noisyquant", 6, {"tokens": 512}, 128, True),
    "eq_w8a8": ("vit_s14", "easyquant", 8, {}, 128, False),
    "nq_w8a8_calib32": ("vit_s14", "noisyquant", 8, {}, 32, False),
    "nq_w8a8_calib1000": ("vit_s14", "noisyquant", 8, {}, 1000, False),
    "vit_b16": ("vit_b16", "noisyquant", 8, {}, 128, False),
    "vit_b16_grid3": ("vit_b16", "noisyquant", 8, {"grid_stride": 3}, 128, False),
}
DEFAULT_ROWS = ("nq_w8a8", "nq_w8a8_exact", "nq_w8a8_uniform_rows", "nq_w6a6", "nq_w6a6_exact",
                "nq_w6a6_uniform_rows", "vit_b16")


def child(spec: dict) -> None:
    """Convert once and print the summary's timings and this process's peak memory as JSON."""
    sys.path.insert(0, spec["src"])
    import nq_onnx

    search = {"search": nq_onnx.SearchConfig(**spec["search"])} if spec["search"] else {}
    config = nq_onnx.QuantConfig(method=spec["method"], w_bits=spec["bits"], a_bits=spec["bits"],
                                 calib_size=spec["calib_size"], **search)
    start = time.perf_counter()
    result = nq_onnx.convert(spec["model"], spec["out"], spec["calib"], config, force=True, evaluate=False)
    seconds = time.perf_counter() - start
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"convert_s": seconds, "peak_rss_mb": peak, "timings": result.summary.timings,
                      "nq_onnx_file": nq_onnx.__file__, "grid_stride": getattr(config.search, "grid_stride", 1),
                      "screen_tokens": getattr(config.search, "screen_tokens", 0),
                      "screen_keep": getattr(config.search, "screen_keep", None),
                      "read_token_share": getattr(config.search, "read_token_share", 0.0)}))


def source_tree(checkout: Path, into: Path) -> Path:
    """A directory importing ``nq_onnx`` (with its ``passes``/``calibration``/``models`` subpackages, which the
    project maps from top-level folders) from ``checkout``'s files, ahead of the installed package."""
    package = into / "nq_onnx"
    package.mkdir(parents=True)
    for item in (checkout / "nq_onnx").iterdir():
        (package / item.name).symlink_to(item.resolve())
    for sub in ("passes", "calibration", "models"):
        (package / sub).symlink_to((checkout / sub).resolve())
    return into


def convert_once(name: str, src: Path, models: dict, calib: dict, work: Path) -> dict:
    """Convert row ``name`` once in a fresh process: its timings, peak memory and the model's SHA-256."""
    model, method, bits, search, calib_size, _ = ROWS[name]
    out = work / f"compile_{name.replace(':', '_')}.onnx"
    spec = {"src": str(src), "model": str(models[model]), "out": str(out), "calib": str(calib[calib_size]),
            "method": method, "bits": bits, "search": search, "calib_size": calib_size}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: convert failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"out": str(out),
                                                               "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}


def median_entry(name: str, runs: list[dict]) -> dict:
    """The run of median wall time, with every run's wall time (``convert_s_runs``); the runs must have given the
    same model bytes."""
    model, method, bits, _, calib_size, _ = ROWS[name]
    digests = {r["sha256"] for r in runs}
    if len(digests) != 1:
        raise RuntimeError(f"{name}: {len(runs)} conversions gave {len(digests)} different models")
    entry = sorted(runs, key=lambda r: r["convert_s"])[(len(runs) - 1) // 2]
    return entry | {"model": model, "method": method, "bits": bits, "calib_images": calib_size,
                    "convert_s_runs": [r["convert_s"] for r in runs]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--before", type=Path,
                        help="also convert each requested default-settings row with the nq-onnx of this checkout")
    parser.add_argument("--before-label", default="before", help="the row-name prefix of --before (default: before)")
    parser.add_argument("--repeat", type=int, default=1, help="conversions per row; the median wall time is kept")
    parser.add_argument("--cifar-per-class", type=int, default=100)
    parser.add_argument("--imagenet-eval", type=int, default=200)
    parser.add_argument("--append", action="store_true", help="keep the other rows of an existing results file")
    parser.add_argument("--name", default="compile_cost", help="results file name (default: compile_cost)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    sys.path.insert(0, str(ROOT / "benchmarks"))  # run imports nq_onnx: not before a child has chosen its checkout
    from run import RESULTS, WORK, machine, other_cpu_kind

    WORK.mkdir(parents=True, exist_ok=True)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    models, calib = row_models(rows, WORK), row_calibration(rows, WORK)
    path = RESULTS / f"{args.name}.json"
    results = json.loads(path.read_text()) if args.append and path.exists() else {"rows": {}}
    here = machine()
    mismatch = results.get("machine") and other_cpu_kind(path, results["machine"], here)
    if mismatch:
        print(mismatch, file=sys.stderr)
        return 2
    results.update(machine=here, settings={"cifar_per_class": args.cifar_per_class,
                                                "imagenet_eval": args.imagenet_eval, "calib_seed": 0})
    scoring = Scoring.load(models["vit_s14"], args.cifar_per_class, args.imagenet_eval)
    with tempfile.TemporaryDirectory() as tmp:
        jobs = row_jobs(rows, args.before, args.before_label, Path(tmp))
        runs: dict[str, list[dict]] = {name: [] for name, _ in jobs}
        for turn in range(args.repeat):  # round-robin: the machine's drift falls on every row alike
            for name, src in jobs:
                log(f"{name}: converting ({turn + 1}/{args.repeat})")
                runs[name].append(convert_once(name, src, models, calib, WORK))
        for name, src in jobs:
            results["rows"][name] = row_entry(name, runs[name], models, scoring,
                                              None if src == ROOT else args.before)
            results["finished"] = time.time()
            write_results(path, results)
    if scoring.reference is not None:
        from nq_onnx.calibration.evaluate import output_metrics

        results["fp32_top1"] = output_metrics(scoring.reference["cifar"], scoring.reference["cifar"],
                                              scoring.labels)["top1"]
        write_results(path, results)
    log(f"wrote {path}")
    return 0


def write_results(path: Path, results: dict) -> None:
    from run import plain

    path.write_text(json.dumps(results, indent=1, sort_keys=True, default=plain) + "\n")


def row_models(rows: list[str], work: Path) -> dict[str, Path]:
    """The models the rows convert: the real ViT-S/14, and a ViT-B/16 with random weights where a row asks for it
    (the cost of a conversion does not depend on the weights)."""
    from run import export_model

    from nq_onnx.export import export_timm

    models = {"vit_s14": export_model(work / "vit_s14_dinov2_cifar10.onnx")}
    if any(ROWS[r][0] == "vit_b16" for r in rows):
        models["vit_b16"] = work / "vit_base_patch16_224_random.onnx"
        if not models["vit_b16"].exists():
            export_timm("vit_base_patch16_224", models["vit_b16"], num_classes=1000, seed=0)
    return models


def row_calibration(rows: list[str], work: Path) -> dict[int, Path]:
    """A folder of the first (seed 0) calibration images for every size the rows use, and for 128."""
    from run import link_folder, split_imagenet

    return {size: link_folder(split_imagenet(min(size, 1000), 0, 0)[0], work / f"calib{size}")
            for size in {ROWS[r][4] for r in rows} | {128}}


def row_jobs(rows: list[str], before: Path | None, label: str, tmp: Path) -> list[tuple[str, Path]]:
    """``(row, source checkout)`` in conversion order: with ``before``, first every requested default-settings row
    as ``<label>:<row>`` (added to :data:`ROWS`) converted by that checkout, then the rows by this one."""
    jobs = [(r, ROOT) for r in rows]
    if before is not None:
        src = source_tree(before, tmp)
        for row in [r for r in rows if not ROWS[r][3]][::-1]:
            ROWS[f"{label}:{row}"] = ROWS[row]
            jobs.insert(0, (f"{label}:{row}", src))
    return jobs


@dataclasses.dataclass
class Scoring:
    """The held-out ImageNet and CIFAR-10 images scored rows are judged on; FP32's outputs on them once needed."""

    fp32: Path
    held: np.ndarray
    cifar: np.ndarray
    labels: np.ndarray
    reference: dict[str, np.ndarray] | None = None

    @classmethod
    def load(cls, fp32: Path, cifar_per_class: int, imagenet_eval: int) -> "Scoring":
        from run import cifar_subset, image_arrays, split_imagenet

        from nq_onnx.calibration.data import Preprocess

        pre = Preprocess.from_model(onnx.load(str(fp32), load_external_data=False))
        held = image_arrays(split_imagenet(128, imagenet_eval, 0)[1], pre)
        cifar, labels = cifar_subset(cifar_per_class, pre)
        return cls(fp32, held, cifar, labels)

    def score(self, entry: dict) -> None:
        """The converted model's held-out output error and top-1 against FP32's, into ``entry``."""
        from run import run_model

        from nq_onnx.calibration.evaluate import output_metrics

        if self.reference is None:
            self.reference = {"cifar": run_model(self.fp32, self.cifar), "imagenet": run_model(self.fp32, self.held)}
        out = Path(entry["out"])
        entry["imagenet_heldout"] = output_metrics(self.reference["imagenet"], run_model(out, self.held))
        entry["cifar"] = output_metrics(self.reference["cifar"], run_model(out, self.cifar), self.labels)


def row_entry(name: str, runs: list[dict], models: dict[str, Path], scoring: Scoring, before: Path | None) -> dict:
    """A row's results entry: its median run, scored where the row is, with its source checkout (``before``: another
    one than this) and its model's parameter count; logged."""
    entry = median_entry(name, runs)
    if ROWS[name][5]:
        scoring.score(entry)
    if before is not None:
        entry["source"], entry["mirrors"] = str(before), name.split(":", 1)[1]
    graph = onnx.load(str(models[ROWS[name][0]]), load_external_data=False).graph
    entry["parameters_m"] = sum(int(np.prod(t.dims)) for t in graph.initializer) / 1e6
    log(f"{name}: {entry['convert_s']:.1f} s, {entry['peak_rss_mb']:.0f} MB"
        + (f", held-out MSE {entry['imagenet_heldout']['mse']:.5f}, top-1 {entry['cifar']['top1']:.4f}"
           if "cifar" in entry else ""))
    return entry


if __name__ == "__main__":
    sys.exit(main())
