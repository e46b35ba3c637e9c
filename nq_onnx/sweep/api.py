"""``nq_onnx.sweep.run_sweep``: validate, convert and evaluate every trial, time the models, pick, report."""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from nq_onnx.core.atomic import write_bytes_atomic
from nq_onnx.calibration.data import Preprocess, image_files, load_dataset
from nq_onnx.core.config import QuantConfig
from nq_onnx.io.cpu import cpu_features
from nq_onnx.core.errors import ConfigError, NQError
from nq_onnx.io.model_io import load_model
from nq_onnx.sweep.evalset import EvalSet, load_shard, open_eval_set
from nq_onnx.sweep.executors import RayExecutor, Resources, SerialExecutor
from nq_onnx.sweep.pick import METRICS, choose, parse_pick
from nq_onnx.sweep.report import chart, command_line, markdown_table
from nq_onnx.sweep.results import ResultsFile, data_digest
from nq_onnx.sweep.run import identity, reference, reference_key, run_trials, shard_size
from nq_onnx.sweep.spec import SweepSpec, load_spec

log = logging.getLogger(__name__)

LATENCY_GROUP = 4  # models timed together with FP32, round-robin: few sessions in memory, FP32 in every group


@dataclasses.dataclass(frozen=True)
class Choice:
    """What to pick: trials meeting ``expression`` with the best ``objective``."""

    expression: str | None = None
    objective: str | None = None
    maximize: bool = False

    def __post_init__(self) -> None:
        if self.expression is not None and self.objective is None:
            raise ConfigError("--pick needs --minimize METRIC or --maximize METRIC")
        if self.objective is not None and self.objective not in METRICS:
            raise ConfigError(f"unknown metric {self.objective!r} to optimize; metrics are {', '.join(METRICS)}")


@dataclasses.dataclass
class SweepResult:
    spec: SweepSpec
    records: list[dict]  # the sweep's succeeded trials in sweep order, latency merged into their metrics
    failed: list[dict]
    fp32: dict[str, float]
    labels: list[str]
    chosen: dict | None = None
    command: str | None = None
    files: dict[str, Path] = dataclasses.field(default_factory=dict)
    run: dict = dataclasses.field(default_factory=dict)


def available_metrics(spec: SweepSpec) -> set[str]:
    names = {"mse", "sqnr_db", "cosine", "size_mb", "convert_s"}
    names |= {"top1", "agreement"} if spec.labelled is not None else set()
    return names | ({"latency_ms", "latency_ratio"} if spec.latency_rounds else set())


def seed_warning(spec: SweepSpec) -> str | None:
    """Why the seeds of a sweep calibrate on the same inputs, where they do: a seed chooses ``calib_size`` images from
    a calibration folder holding more (and draws NoisyQuant's noise); from a folder holding no more, or from tensors
    (whose first ``calib_size`` rows every seed takes), the seeds change the noise alone."""
    sizes = [t.config.calib_size for t in spec.trials() if t.config is not None]
    if len(spec.seeds) < 2 or not sizes:
        return None
    calib = Path(spec.calib)
    if not calib.is_dir():
        return (f"{spec.path.name}: every seed calibrates on the first calib_size rows of {calib.name}; the seeds "
                "change only NoisyQuant's noise draw")
    count = len(image_files(calib))
    if count > min(sizes):
        return None
    return (f"{spec.path.name}: {calib.name} holds {count} images and the trials calibrate on {min(sizes)}: every "
            "seed calibrates on the same images and changes only NoisyQuant's noise draw; give the calibration "
            "folder more images than calib_size for seeds that vary the calibration data")


def run_sweep(path: str | Path, *, address: str | None = None, local: bool = False, choice: Choice = Choice(),
              retry_failed: bool = False, progress: Callable[[str], None] | None = None,
              num_cpus: int | None = None) -> SweepResult:
    """Run the sweep file at ``path`` (resuming its results file), then time, pick and report.

    Trials run on the Ray cluster at ``address``, on a local Ray of ``num_cpus`` (default: every core), or with
    ``local`` in this process, one after another.

    Everything that can be wrong with the input (the file, the data, the pick, the cluster address) is an error
    before the first trial runs and before anything is written. ``progress`` receives one line per finished trial.
    """
    say = progress or (lambda line: None)
    spec = load_spec(path)
    warning = seed_warning(spec)
    if warning:
        log.warning("%s", warning)
    conditions = _check_choice(spec, choice)
    model, _ = load_model(spec.model)
    load_dataset(spec.calib, model, limit=1, seed=0)  # calibration data that cannot feed the model fails every trial
    sets = _eval_sets(spec, model)
    pre = Preprocess.from_model(model) if any(s.kind != "tensors" for s in sets.values()) else None
    results = ResultsFile(spec.out / "results.jsonl")
    ident = identity(spec, {name: data_digest(p) for name, p in
                            (("calib", spec.calib), ("labelled", spec.labelled), ("heldout", spec.heldout)) if p})
    results.check(ident)
    executor = SerialExecutor() if local else RayExecutor(address, spec.cpus_per_trial, num_cpus)
    begin = time.perf_counter()
    try:
        (spec.out / "models").mkdir(parents=True, exist_ok=True)
        ref = reference(executor, spec, sets, pre, _shard_resources(spec, sets, pre), reference_key(ident, spec, pre))
        if results.header is None:
            results.append({"kind": "sweep", "identity": ident, "fp32": ref.metrics, "file": str(spec.path)})
        todo = [t for t in spec.trials() if t.key not in results.trials
                or (retry_failed and results.trials[t.key]["status"] == "failed")]
        say(f"sweep {spec.path.name}: {len(spec.trials())} trials, {len(todo)} to run on {executor.workers} "
            f"{executor.name} worker(s)")
        memory = (_trial_resources(spec), _shard_resources(spec, sets, pre))
        run_trials(executor, spec, todo, ref, results, memory, _reporter(spec, len(todo), say))
        workers = executor.workers
    finally:
        executor.close()
    trials_s = time.perf_counter() - begin
    latency_s = measure_latency(spec, results, sets, pre, say)
    results.append({"kind": "run", "executor": executor.name, "workers": workers, "trials_run": len(todo),
                    "trials_s": trials_s, "latency_s": latency_s, "address": address, "finished": time.time()})
    return _conclude(spec, results, conditions, choice)


def _check_choice(spec: SweepSpec, choice: Choice) -> tuple:
    available = available_metrics(spec)
    if choice.objective is not None and choice.objective not in available:
        raise ConfigError(f"this sweep does not measure {choice.objective!r} (it measures "
                          f"{', '.join(m for m in METRICS if m in available)})")
    return parse_pick(choice.expression, available) if choice.expression else ()


def _eval_sets(spec: SweepSpec, model) -> dict[str, EvalSet]:
    sets = {}
    if spec.labelled is not None:
        sets["labelled"] = open_eval_set(spec.labelled, model, spec.limit, labelled=True, per_class=spec.per_class)
    if spec.heldout is not None:
        sets["heldout"] = open_eval_set(spec.heldout, model, spec.heldout_limit, labelled=False)
    return sets


def _trial_resources(spec: SweepSpec) -> Resources:
    """A conversion's memory: the sweep file's figure, or about ten times the model (ViT-S/14: 88 MB, peak RSS of a
    conversion about 0.9 GB)."""
    size = spec.model.stat().st_size
    memory = spec.trial_memory_gb * 1e9 if spec.trial_memory_gb else 0.4e9 + 10 * size
    return Resources(spec.cpus_per_trial, int(memory))


def _shard_resources(spec: SweepSpec, sets: dict[str, EvalSet], pre: Preprocess | None) -> Resources:
    per_input = 4 * int(np.prod(pre.input_size)) if pre is not None else 4 * 3 * 224 * 224
    return Resources(1, int(0.2e9 + 4 * spec.model.stat().st_size + 2 * shard_size(spec) * per_input))


def _reporter(spec: SweepSpec, total: int, say: Callable[[str], None]) -> Callable[[dict], None]:
    start, count, varied = time.perf_counter(), [0], spec.varied()
    labels = {t.key: t.label(varied) for t in spec.trials()}

    def on_record(record: dict) -> None:
        count[0] += 1
        elapsed = time.perf_counter() - start
        left = elapsed / count[0] * (total - count[0])
        say(f"[{count[0]}/{total}] {labels[record['trial']]}: {_figures(record)}; {_duration(left)} left")

    return on_record


def _figures(record: dict) -> str:
    if record["status"] == "failed":
        return f"failed: {record['error']}"
    m = record["metrics"]
    top1 = f"top-1 {m['top1']:.2f} %, " if "top1" in m else ""
    return f"{top1}MSE {m['mse']:.4g}, {m['size_mb']:.1f} MB, convert {m['convert_s']:.1f} s"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def measure_latency(spec: SweepSpec, results: ResultsFile, sets: dict[str, EvalSet], pre: Preprocess | None,
                    say: Callable[[str], None]) -> float:
    """Time every succeeded model not yet timed, here and alone, each group interleaved round-robin with FP32."""
    from nq_onnx.io.latency import latency_round_robin

    if not spec.latency_rounds:
        return 0.0
    begin = time.perf_counter()
    keys = [t.key for t in spec.trials() if results.trials.get(t.key, {}).get("status") == "ok"
            and t.key not in results.latency and (spec.out / results.trials[t.key]["model"]).exists()]
    data = next(iter(sets.values()))
    batch = _latency_batch(data, pre, spec)
    for start in range(0, len(keys), LATENCY_GROUP):
        group = keys[start:start + LATENCY_GROUP]
        paths = {"fp32": spec.model, **{k: spec.out / results.trials[k]["model"] for k in group}}
        stats = latency_round_robin(paths, batch, spec.latency_rounds, threads=spec.latency_threads)
        for key in group:
            results.append({"kind": "latency", "trial": key, **stats[key], "fp32_ms": stats["fp32"]["median_ms"],
                            "ratio_to_fp32": stats[key]["median_ms"] / stats["fp32"]["median_ms"],
                            "threads": spec.latency_threads, "cpu": cpu_features().to_dict()})
        say(f"latency: {min(start + LATENCY_GROUP, len(keys))}/{len(keys)} models timed")
    return time.perf_counter() - begin


def _latency_batch(data: EvalSet, pre: Preprocess | None, spec: SweepSpec) -> np.ndarray:
    from nq_onnx.io.model_io import load_model as load

    inputs = load_shard(data, pre, load(spec.model)[0], 0, min(spec.latency_batch, len(data)))
    if not isinstance(inputs, np.ndarray):
        if len(inputs) != 1:
            raise NQError("latency is timed on single-input models only; set [latency] rounds = 0")
        inputs = next(iter(inputs.values()))
    return inputs


def _conclude(spec: SweepSpec, results: ResultsFile, conditions: tuple, choice: Choice) -> SweepResult:
    trials, varied = spec.trials(), spec.varied()
    mine = [(t, results.trials[t.key]) for t in trials if t.key in results.trials]
    ok = [(t, _with_latency(r, results)) for t, r in mine if r["status"] == "ok"]
    fp32 = dict(results.header["fp32"])
    if spec.latency_rounds and results.latency:
        fp32["latency_ms"] = statistics.median(e["fp32_ms"] for e in results.latency.values())
        fp32["latency_ratio"] = 1.0
    records, labels = [r for _, r in ok], [t.label(varied) for t, _ in ok]
    out = SweepResult(spec, records, [r for _, r in mine if r["status"] == "failed"], fp32, labels,
                      run=results.runs[-1] if results.runs else {})
    if choice.objective is not None:
        out.chosen = choose(records, fp32, conditions, choice.objective, choice.maximize)
        if out.chosen is None:
            raise NQError(f"no trial meets {choice.expression!r}; the results are in {results.path}")
        _write_choice(spec, out)
    _write_report(spec, out)
    return out


def _with_latency(record: dict, results: ResultsFile) -> dict:
    timing = results.latency.get(record["trial"])
    if timing is None:
        return record
    return record | {"metrics": record["metrics"] | {"latency_ms": timing["median_ms"],
                                                     "latency_ratio": timing["ratio_to_fp32"]}}


def _write_choice(spec: SweepSpec, out: SweepResult) -> None:
    config = QuantConfig.from_dict(out.chosen["config"])
    model = spec.out / "picked.onnx"
    write_bytes_atomic(model, (spec.out / out.chosen["model"]).read_bytes())
    out.command = command_line(str(spec.model), str(spec.calib), str(model), config,
                               (out.chosen.get("worker") or {}).get("blas"))
    write_bytes_atomic(spec.out / "picked.txt", (out.command + "\n").encode())
    out.files |= {"picked": model, "command": spec.out / "picked.txt"}


def _write_report(spec: SweepSpec, out: SweepResult) -> None:
    if not out.records:
        return
    chosen = out.labels[out.records.index(out.chosen)] if out.chosen is not None else None
    lines = [f"# Sweep {spec.path.name}", "", f"Model `{spec.model.name}`, {len(out.records)} trials succeeded, "
             f"{len(out.failed)} failed." + (f" Chosen: **{chosen}**." if chosen else ""), "",
             markdown_table(out.records, out.fp32, out.labels, out.chosen)]
    if out.failed:
        lines += ["Failed trials:", ""] + [f"- {r['options']}: {r['error']}" for r in out.failed] + [""]
    if out.command:
        lines += ["Reproduce the chosen model:", "", "```", out.command, "```", ""]
    write_bytes_atomic(spec.out / "report.md", "\n".join(lines).encode())
    write_bytes_atomic(spec.out / "pareto.png", chart(out.records, out.fp32, out.chosen))
    out.files |= {"report": spec.out / "report.md", "chart": spec.out / "pareto.png"}
