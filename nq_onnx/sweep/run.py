"""The sweep's driver: the FP32 reference, the trials (conversions, then their evaluation shards), the latency.

The driver holds one trial per free slot in flight, and per trial only what its metrics need until they are
recorded, so its memory does not grow with the number of trials.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nq_onnx.calibration.data import Preprocess
from nq_onnx.calibration.evaluate import output_metrics
from nq_onnx.core.atomic import write_bytes_atomic
from nq_onnx.core.errors import ConfigError, DataError, NQError
from nq_onnx.io.model_io import file_digest
from nq_onnx.sweep.evalset import EvalSet
from nq_onnx.sweep.executors import Resources
from nq_onnx.sweep.results import ResultsFile
from nq_onnx.sweep.spec import SweepSpec, Trial
from nq_onnx.sweep.tasks import convert_trial, evaluate_shard

FP32_OUTPUTS = "fp32_outputs.npz"  # FP32's outputs on the evaluation sets, kept for the next run
EVAL_BATCH = 8  # shards start on a multiple of it, so a sharded evaluation runs the same batches as one pass


@dataclasses.dataclass
class Reference:
    """The FP32 model's outputs on each evaluation set, the labels, and the shared values every task reads."""

    sets: dict[str, Any]  # name -> EvalSet (or the executor's reference to it)
    shards: dict[str, list[tuple[int, int]]]
    outputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    preprocess: Any
    metrics: dict[str, float]


@dataclasses.dataclass
class InFlight:
    trial: Trial
    path: Path
    convert: dict | None = None
    outputs: dict[str, list] = dataclasses.field(default_factory=dict)
    waiting: int = 0


def shard_size(spec: SweepSpec) -> int:
    return -(-spec.shard_size // EVAL_BATCH) * EVAL_BATCH


def evaluate_model(executor, model: Path, ref: Reference, resources: Resources) -> dict[str, list]:
    """Submit ``model``'s evaluation shards; returns the pending tasks per set, in shard order."""
    return {name: [executor.submit(evaluate_shard, (str(model), ref.sets[name], ref.preprocess, a, b, EVAL_BATCH),
                                   resources) for a, b in ref.shards[name]] for name in ref.sets}


def reference(executor, spec: SweepSpec, sets: dict[str, EvalSet], pre: Preprocess | None,
              resources: Resources, key: dict | None = None) -> Reference:
    """The FP32 outputs, through the same sharded evaluation as every trial. With a ``key`` (what the outputs depend
    on: :func:`reference_key`) they are kept in ``out/fp32_outputs.npz``, and a sweep run again with the same key
    reads them there instead of evaluating FP32 again."""
    shared = {name: executor.put(data) for name, data in sets.items()}
    ref = Reference(shared, {n: d.shards(shard_size(spec)) for n, d in sets.items()}, {}, None,
                    executor.put(pre), {})
    cache = spec.out / FP32_OUTPUTS
    ref.outputs = _cached_outputs(cache, key, set(sets))
    if ref.outputs is None:
        pending = evaluate_model(executor, spec.model, ref, resources)
        ref.outputs = {name: np.concatenate([executor.result(task) for task in tasks])
                       for name, tasks in pending.items()}
        if key is not None:
            _store_outputs(cache, key, ref.outputs)
    labelled = sets.get("labelled")
    ref.labels = None if labelled is None else np.asarray(labelled.labels, np.int64)
    ref.metrics = model_metrics(ref.outputs, ref)
    ref.metrics["size_mb"] = spec.model.stat().st_size / 1e6
    return ref


def reference_key(identity: dict, spec: SweepSpec, pre: Preprocess | None) -> dict:
    """What FP32's outputs depend on: the sweep's model and data (``identity``), the shards, the image preparation
    and the onnxruntime that ran them."""
    import onnxruntime

    return {**identity, "shard_size": shard_size(spec), "onnxruntime": onnxruntime.__version__,
            "preprocess": None if pre is None else dataclasses.asdict(pre)}


def _cached_outputs(path: Path, key: dict | None, names: set[str]) -> dict[str, np.ndarray] | None:
    """The outputs kept at ``path`` under ``key``, or ``None`` (no key, no file, another key, an unreadable file)."""
    if key is None or not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) != json.dumps(key, sort_keys=True):
                return None
            outputs = {name: stored[f"outputs.{name}"] for name in names}
    except (OSError, ValueError, KeyError, EOFError):
        return None
    return outputs


def _store_outputs(path: Path, key: dict, outputs: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(json.dumps(key, sort_keys=True)),
             **{f"outputs.{name}": array for name, array in outputs.items()})
    write_bytes_atomic(path, buffer.getvalue())


def model_metrics(outputs: dict[str, np.ndarray], ref: Reference) -> dict[str, float]:
    """top-1 and agreement with FP32 (percent) on the labelled set; output error on the held-out set (or the
    labelled one when there is none)."""
    metrics: dict[str, float] = {}
    if "labelled" in outputs:
        labelled = output_metrics(ref.outputs["labelled"], outputs["labelled"], ref.labels)
        if "top1" not in labelled:
            raise DataError("top-1 needs the model's first output to be (batch, classes) logits")
        metrics |= {"top1": 100 * labelled["top1"], "agreement": 100 * labelled["top1_agreement"]}
    name = "heldout" if "heldout" in outputs else "labelled"
    error = output_metrics(ref.outputs[name], outputs[name])
    return metrics | {"mse": error["mse"], "sqnr_db": error["sqnr_db"], "cosine": error["cosine"]}


def run_trials(executor, spec: SweepSpec, trials: list[Trial], ref: Reference, results: ResultsFile,
               memory: tuple[Resources, Resources], on_record: Callable[[dict], None]) -> None:
    """Convert and evaluate every trial, recording each when its last shard is in; a failure is recorded too."""
    queue, flights, tasks = list(reversed(trials)), {}, {}
    while queue or tasks:
        while queue and len(flights) < executor.slots:
            trial = queue.pop()
            flight = InFlight(trial, spec.out / "models" / f"{trial.key}.onnx")
            if trial.config is None:  # a combination the configuration refuses: recorded, not run
                on_record(_record(results, flight, error=ConfigError(trial.error)))
                continue
            flights[trial.key] = flight
            args = (str(spec.model), str(spec.calib), trial.config.to_dict(), str(flight.path))
            tasks[executor.submit(convert_trial, args, memory[0])] = (trial.key, None, 0)
        if not tasks:
            continue
        task = executor.wait(list(tasks))
        key, set_name, index = tasks.pop(task)
        flight = flights.get(key)
        if flight is None:  # a shard of a trial that already failed
            continue
        try:
            value = executor.result(task)
        except Exception as exc:  # the trial's error, recorded; the sweep goes on
            del flights[key]
            on_record(_record(results, flight, error=exc))
            continue
        if set_name is None:
            flight.convert = value
            for name, shards in evaluate_model(executor, flight.path, ref, memory[1]).items():
                flight.outputs[name] = [None] * len(shards)
                tasks.update({shard: (key, name, i) for i, shard in enumerate(shards)})
                flight.waiting += len(shards)
            continue
        flight.outputs[set_name][index] = value
        flight.waiting -= 1
        if flight.waiting == 0:
            del flights[key]
            outputs = {name: np.concatenate(parts) for name, parts in flight.outputs.items()}
            on_record(_record(results, flight, metrics=model_metrics(outputs, ref)))


def _record(results: ResultsFile, flight: InFlight, metrics: dict | None = None, error: BaseException | None = None
            ) -> dict:
    convert = flight.convert or {}
    entry = {
        "kind": "trial", "trial": flight.trial.key, "status": "failed" if error else "ok",
        "options": dict(flight.trial.options), "seed": dict(flight.trial.options)["seed"],
        "config": None if flight.trial.config is None else flight.trial.config.to_dict(), "finished": time.time(),
        "error": None if error is None else _error_text(error),
        "model": str(flight.path.relative_to(results.path.parent)) if error is None else None,
        "sha256": convert.get("sha256"), "worker": convert.get("worker"),
        "convert": {k: v for k, v in convert.items() if k not in ("sha256", "worker")},
        "metrics": None if metrics is None else metrics | {"size_mb": convert["size_mb"],
                                                           "convert_s": convert["convert_s"]},
    }
    results.append(entry)
    return entry


def _error_text(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text if isinstance(error, NQError) else f"{type(error).__name__}: {text}"


def identity(spec: SweepSpec, digests: dict[str, str]) -> dict:
    """What the results of a sweep depend on besides each trial's configuration: the model and the data."""
    chosen = {"per_class": spec.per_class} if spec.per_class is not None else {}  # sweeps without it: as before
    return {"model_sha256": file_digest(spec.model), **digests, "limit": spec.limit, **chosen,
            "heldout_limit": spec.heldout_limit, "eval_batch": EVAL_BATCH}
