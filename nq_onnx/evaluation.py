"""What a conversion is judged on: the evaluation inputs, the output error and top-1 on them, latency, kernels.

The evaluation set is chosen before any work, so that a wrong one is refused before calibrating:

- ``eval_data`` given: all of it (a folder of images, a class-folder tree or an ``.npy``/``.npz`` of tensors);
- otherwise up to :data:`EVAL_INPUTS` inputs of the calibration source that the conversion does not calibrate on
  (:func:`nq_onnx.calibration.data.held_out_dataset`): neither the statistics nor the searches read them;
- otherwise, when the calibration source has none to spare, the first calibration inputs, which the searches
  fitted on: the summary and the report say so.

Labels come from ``eval_labels`` (one integer per input, in the order of the sorted image paths or of the tensor
rows), from a class-folder layout of ``eval_data`` (the top sub-folder's index in sorted order) or from an
``.npz``'s ``labels`` array.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from nq_onnx.calibration.data import (Dataset, Preprocess, class_folder_labels, held_out_dataset, load_dataset,
                                      load_labels, read_labels_file)
from nq_onnx.calibration.evaluate import model_outputs, output_metrics
from nq_onnx.core.config import QuantConfig
from nq_onnx.io.cpu import cpu_features
from nq_onnx.core.errors import ConfigError, DataError
from nq_onnx.core.timing import timed
from nq_onnx.report.summary import Evaluation, Kernels, Latency, Summary

log = logging.getLogger(__name__)

EVAL_INPUTS = 64  # held-out calibration-source inputs, at most
LATENCY_BATCH = 8
LATENCY_ROUNDS = 20
LATENCY_THREADS = 2


@dataclasses.dataclass
class EvalInputs:
    dataset: Dataset
    evaluation: Evaluation
    labels: np.ndarray | None = None  # one class index per input of ``dataset``


def eval_inputs(model: onnx.ModelProto, config: QuantConfig, calib_source: str | Path | None, calib: Dataset | None,
                eval_data: str | Path | None = None, eval_labels: str | Path | None = None,
                preprocess: Preprocess | None = None) -> EvalInputs | None:
    """The inputs to evaluate on (see the module docstring), checked against the model; ``None`` without data."""
    if eval_labels is not None and eval_data is None:
        raise DataError("--eval-labels needs --eval DATA: the images or tensors the labels belong to")
    if eval_data is not None:
        return given_inputs(model, config, eval_data, eval_labels, preprocess)
    if calib is None or calib_source is None:
        return None
    return held_out_inputs(calib_source, calib, config)


def judged_inputs(model: onnx.ModelProto, config: QuantConfig, calib: str | Path | None, dataset: Dataset | None,
                  evaluate: bool, eval_data: str | Path | None, eval_labels: str | Path | None,
                  pre: Preprocess | None, latency: bool) -> EvalInputs | None:
    """A conversion's evaluation (and timing) inputs, refused in one line, before any work, if they cannot serve."""
    if not evaluate and (eval_data is not None or eval_labels is not None):
        raise ConfigError(f"{'--eval' if eval_data is not None else '--eval-labels'} and --no-eval contradict each "
                          "other")
    judged = eval_inputs(model, config, calib, dataset, eval_data, eval_labels, pre) if evaluate or latency else None
    if latency and judged is None:
        raise DataError("--latency needs inputs to time: --calib DATA or --eval DATA")
    return judged


def judge(model: onnx.ModelProto, quantized: onnx.ModelProto, summary: Summary, judged: EvalInputs | None,
          config: QuantConfig, progress: Callable | None = None, kernels: bool = False,
          base: onnx.ModelProto | None = None) -> None:
    """Fill in ``summary``'s output error on ``judged`` (if any), the base method's (``base``: MinMax's model,
    :func:`nq_onnx.pipeline.base_model`) and a warning where the conversion's is far above it
    (:func:`base_warning`), and, with ``kernels``, the integer-kernel check."""
    if judged is not None:
        with timed(summary.timings, "evaluate_s"):
            summary.metrics, summary.base_metrics = evaluate(model, quantized, judged, summary.method,
                                                             config.batch_size, progress, base)
            summary.evaluation = judged.evaluation
        warning = base_warning(summary)
        if warning:
            summary.warnings.append(warning)
            log.warning("%s", warning)
    if kernels:
        with timed(summary.timings, "kernels_s"):
            summary.kernels = check_kernels(quantized, config.target.value)


def given_inputs(model: onnx.ModelProto, config: QuantConfig, source: str | Path, labels_path: str | Path | None,
                 preprocess: Preprocess | None) -> EvalInputs:
    source = Path(source)
    if not source.exists():
        raise DataError(f"evaluation data not found: {source}")
    if not source.is_dir() and source.suffix not in (".npy", ".npz"):
        raise DataError(f"evaluation data {source} is neither a folder of images nor an .npy/.npz file")
    dataset = load_dataset(source, model, limit=None, seed=config.seed, preprocess=preprocess)
    labels, origin = _labels(source, dataset, labels_path)
    evaluation = Evaluation("eval", len(dataset), str(source), dataset.arrays is not None, origin)
    return EvalInputs(dataset, evaluation, labels)


def _labels(source: Path, dataset: Dataset, labels_path: str | Path | None) -> tuple[np.ndarray | None, str]:
    """The labels of ``dataset`` and where they came from."""
    folder = dataset.arrays is None
    if labels_path is not None:
        labels = read_labels_file(labels_path)
        listed = sorted([*dataset.files, *map(Path, dataset.skipped)]) if folder else None
        count = len(listed) if folder else len(dataset)
        if len(labels) != count:
            raise DataError(f"{labels_path} has {len(labels)} labels for the {count} "
                            f"{'images' if folder else 'inputs'} of {source}")
        if folder and dataset.skipped:  # the labels of the unreadable files go with them
            skipped = set(map(Path, dataset.skipped))
            labels = labels[[i for i, path in enumerate(listed) if path not in skipped]]
        return labels, f"{Path(labels_path).name} ({len(labels)})"
    if folder:
        found = class_folder_labels(source, dataset.files)
        return (found[0], f"class sub-folders ({len(found[1])} classes)") if found else (None, "")
    labels = load_labels(source, len(dataset))
    return labels, "the .npz's labels array" if labels is not None else ""


def held_out_inputs(source: str | Path, calib: Dataset, config: QuantConfig) -> EvalInputs:
    tensors = calib.arrays is not None
    held = held_out_dataset(source, calib, count=EVAL_INPUTS, limit=config.calib_size, seed=config.seed)
    if held is None:
        subset = calib.head(min(len(calib), EVAL_INPUTS))
        labels = load_labels(source, len(subset)) if tensors else None
        evaluation = Evaluation("calibration", len(subset), str(source), tensors,
                                "the .npz's labels array" if labels is not None else "")
        return EvalInputs(subset, evaluation, labels)
    labels = load_labels(source, config.calib_size + len(held)) if tensors else None
    labels = None if labels is None else labels[config.calib_size:]
    evaluation = Evaluation("held-out", len(held), str(source), tensors,
                            "the .npz's labels array" if labels is not None else "")
    return EvalInputs(held, evaluation, labels)


def evaluate(model: onnx.ModelProto, quantized: onnx.ModelProto, inputs: EvalInputs, method: str, batch_size: int,
             progress: Callable | None = None,
             base: onnx.ModelProto | None = None) -> tuple[dict[str, dict[str, float]], dict[str, float] | None]:
    """Output error of ``quantized`` against ``model`` on the evaluation inputs (``method``), and with labels
    top-1 of both (``fp32`` and ``method``); and the same of the ``base`` model (``None`` without one)."""
    reference = model_outputs(model, inputs.dataset, batch_size, progress, "evaluate fp32")
    output = model_outputs(quantized, inputs.dataset, batch_size, progress, "evaluate quantized")
    metrics = {}
    if inputs.labels is not None:
        metrics["fp32"] = output_metrics(reference, reference, inputs.labels)
    metrics[method] = output_metrics(reference, output, inputs.labels)
    if base is None:
        return metrics, None
    base_output = model_outputs(base, inputs.dataset, batch_size, progress, "evaluate minmax")
    return metrics, output_metrics(reference, base_output, inputs.labels)


FAR_DB = 3.0  # a conversion whose SQNR is this far below the base method's is warned about (MSE about 2x)


def base_warning(summary: Summary) -> str | None:
    """A warning when the conversion's output SQNR on the evaluation inputs is more than :data:`FAR_DB` below the
    base method's (MinMax of the same widths: no search, no noise), which a searched quantization should beat; on a
    model whose statistics mislead the searches (attention maps near uniform, as at initialization) it may not."""
    ours, base = summary.metrics.get(summary.method), summary.base_metrics
    if ours is None or base is None or not ours["sqnr_db"] < base["sqnr_db"] - FAR_DB:
        return None
    return (f"warning: the output error is far above the base method's on the same inputs (SQNR {ours['sqnr_db']:.2f}"
            f" dB against MinMax's {base['sqnr_db']:.2f} dB): the searched quantizers lost to the plain ones here; "
            "try --method easyquant, fewer options, or other calibration data")


def measure_latency(fp32: Path, quantized: Path | onnx.ModelProto, dataset: Dataset) -> Latency:
    """Batch latency of the two models, interleaved round-robin (:func:`nq_onnx.io.latency.latency_round_robin`) on the
    first :data:`LATENCY_BATCH` evaluation inputs; an in-memory quantized model is timed from a temporary file."""
    from nq_onnx.io.latency import latency_round_robin
    from nq_onnx.io.model_io import save_model_atomic

    batch = next(dataset.batches(LATENCY_BATCH))
    with tempfile.TemporaryDirectory(prefix="nq-latency-") as folder:
        if isinstance(quantized, onnx.ModelProto):
            save_model_atomic(quantized, Path(folder) / "quantized.onnx")
            quantized = Path(folder) / "quantized.onnx"
        stats = latency_round_robin({"fp32": fp32, "quantized": quantized}, batch, LATENCY_ROUNDS,
                                    threads=LATENCY_THREADS)
    cpu = cpu_features()
    f, q = stats["fp32"], stats["quantized"]
    return Latency(f["batch"], f["median_ms"], q["median_ms"], (f["p10_ms"], f["p90_ms"]), (q["p10_ms"], q["p90_ms"]),
                   LATENCY_ROUNDS, LATENCY_THREADS, f"{cpu.model or 'an unnamed CPU'} ({cpu.kind})")


def check_kernels(quantized: onnx.ModelProto, target: str) -> Kernels:
    """Which quantized matmuls onnxruntime's optimized graph runs on integer kernels, and whether the model suits
    ``target`` (:func:`nq_onnx.inspect.target_failures`)."""
    from nq_onnx.inspect import inspect_model, target_failures

    inspection = inspect_model(quantized)
    layers = inspection.layers
    return Kernels(target, sum(k.integer for k in layers), len(layers), tuple(target_failures(inspection, target)))
