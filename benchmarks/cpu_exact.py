"""W8A8 on the CPU this runs on: what onnxruntime's integer kernels compute against what the QDQ graph says.

    python benchmarks/cpu_exact.py           # about 7 minutes on a 2-core AVX-512 VNNI EPYC (two searches)
    python benchmarks/cpu_exact.py --quick   # a few minutes
    python benchmarks/cpu_exact.py --reuse   # keep the models of an earlier run in benchmarks/work/cpu_exact

Rows (every nq-onnx row W8A8 with the defaults, unless it says otherwise):

- ``default_w8a8``: ``nq-onnx convert`` with no options, the ``portable`` target: int8 weight codes with each pair
  the U8S8 kernel adds into 16 bits kept to ``|q1| + |q2| <= 128`` (``int8-paired``), exact on every CPU;
- ``vnni_w8a8``: ``--target x86-vnni``, unconstrained int8 codes (the fastest kernels; what onnxruntime's
  ``quantize_static`` writes by default), which saturate on x86 CPUs without VNNI;
- ``vnni_w8a8_auto``: that plan stored ``--weight-dtype auto`` (uint8 codes with zero point 128 where an int8 pair
  sum could overflow): the same codes, exact on every CPU, on slower kernels;
- onnxruntime's ``quantize_static`` in its int8 and U8U8 forms (the latter the advice of its documentation for
  CPUs without VNNI).

Every quantized matmul is cut out of each model with its Q/DQ nodes (``onnx.utils.extract_model``), fed the
activations it sees in the model on held-out images, and run twice: with every graph optimization (the integer
kernel a user gets) and with none (the QDQ graph op by op in float, its own arithmetic). ``kernel SQNR`` is the
worst layer's agreement: float rounding alone leaves it above 100 dB. (Whole models are not compared this way:
a float-rounding difference that moves one code by one step upstream changes everything after it.) Also top-1,
held-out output error, interleaved latency, the layers ``nq-onnx inspect`` flags, and this CPU's features. Writes
``benchmarks/results/cpu_exact_<cpu kind>.json``; ``benchmarks/table.py --readme`` shows every such file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402
from onnxruntime.quantization import QuantType  # noqa: E402
from ort_baseline import quantize_with_onnxruntime  # noqa: E402
from timing import latency_round_robin  # noqa: E402

import nq_onnx  # noqa: E402
from nq_onnx.core import quant  # noqa: E402
from nq_onnx.calibration.data import Preprocess  # noqa: E402
from nq_onnx.calibration.evaluate import output_metrics  # noqa: E402
from nq_onnx.io.cpu import cpu_features  # noqa: E402
from nq_onnx.inspect import inspect_model  # noqa: E402

WORK = run.WORK / "cpu_exact"
TIMED = ("fp32", "default_w8a8", "vnni_w8a8", "vnni_w8a8_auto", "ort_linear_w8a8", "ort_linear_w8a8_u8u8")
# (the exact storage, the fast one) pairs of the same plan, compared in the table's last line
SAME_PLAN = (("vnni_w8a8_auto", "vnni_w8a8"),)


def build_models(fp32: Path, calib_dir: Path, calib_arrays: np.ndarray, calib_size: int, log,
                 reuse: bool = False) -> dict[str, dict]:
    """The module docstring's rows, converted (or, with ``reuse``, kept from an earlier run)."""
    models: dict[str, dict] = {"fp32": {"path": fp32, "bits": 32}}
    searched = (("default_w8a8", nq_onnx.QuantConfig(calib_size=calib_size), "int8-paired"),
                ("vnni_w8a8", nq_onnx.QuantConfig(calib_size=calib_size, target="x86-vnni"), "int8"))
    for name, config, dtype in searched:
        plan = WORK / f"{name}.plan.json"
        if not (reuse and plan.exists()):
            nq_onnx.convert(fp32, WORK / f"{name}.onnx", calib_dir, config, save_plan=plan, force=True,
                            evaluate=False)
        models[name] = {"path": WORK / f"{name}.onnx", "weight_dtype": dtype}
        log(f"{name}: searched")
    nq_onnx.convert(fp32, WORK / "vnni_w8a8_auto.onnx", config=nq_onnx.QuantConfig(weight_dtype="auto"),
                    load_plan=WORK / "vnni_w8a8.plan.json", force=True, evaluate=False)
    models["vnni_w8a8_auto"] = {"path": WORK / "vnni_w8a8_auto.onnx", "weight_dtype": "auto"}
    log("vnni_w8a8_auto: the vnni plan stored auto")
    for name, weight_type in (("ort_linear_w8a8", QuantType.QInt8), ("ort_linear_w8a8_u8u8", QuantType.QUInt8)):
        if not (reuse and (WORK / f"{name}.onnx").exists()):
            quantize_with_onnxruntime(fp32, WORK / f"{name}.onnx", calib_arrays, linear_only=True,
                                      weight_type=weight_type)
        models[name] = {"path": WORK / f"{name}.onnx", "weight_dtype": weight_type.name}
        log(f"{name}: quantize_static")
    return models


def _float_source(tensor: str, producers: dict[str, onnx.NodeProto], constants: set[str]) -> str | None:
    """The float tensor behind an activation ``[Clip ->] QuantizeLinear -> DequantizeLinear`` (None for weights)."""
    dq = producers.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in constants:
        return None
    source = producers[dq.input[0]].input[0]
    clip = producers.get(source)
    return clip.input[0] if clip is not None and clip.op_type == "Clip" else source


def layer_fidelity(path: Path, images: np.ndarray) -> dict:
    """Per quantized matmul: SQNR of its integer kernel against its QDQ arithmetic, on the inputs it really sees."""
    model = onnx.load(str(path))
    producers = {out: node for node in model.graph.node for out in node.output}
    constants = {t.name for t in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and any(
                producers.get(t) is not None and producers[t].op_type == "DequantizeLinear" for t in node.input):
            sources = [s for s in (_float_source(t, producers, constants) for t in node.input[:2]) if s]
            layers.append((node.name, sources, node.output[0]))
    probe = onnx.load(str(path))
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(s, onnx.TensorProto.FLOAT, None)
                              for s in sorted({s for _, sources, _ in layers for s in sources}))
    session = _session(probe.SerializeToString(), False)
    values = dict(zip([o.name for o in session.get_outputs()],
                      session.run(None, {session.get_inputs()[0].name: images})))
    sqnr = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, sources, output in layers:
            sub = str(Path(folder) / "layer.onnx")
            onnx.utils.extract_model(str(path), sub, sources, [output], check_model=False)
            feeds = {s: values[s] for s in sources}
            graph, kernel = (_session(sub, optimized).run(None, feeds)[0] for optimized in (False, True))
            sqnr[name] = quant.sqnr_db(graph, kernel)
    worst = min(sqnr, key=sqnr.get)
    return {"layers": len(sqnr), "worst_db": sqnr[worst], "worst_layer": worst,
            "below_60db": int(sum(v < 60 for v in sqnr.values())), "per_layer_db": sqnr}


def _session(model, optimized: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def kernel_report(path: Path) -> dict:
    inspection = inspect_model(onnx.load(str(path)))
    return {"weight_layers": len(inspection.weight_layers),
            "weight_layers_integer": sum(k.integer for k in inspection.weight_layers),
            "can_overflow_without_vnni": len(inspection.overflow_layers), "weight_dtypes": inspection.weight_dtypes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and timing rounds")
    parser.add_argument("--reuse", action="store_true", help="keep the models an earlier run left in the work folder")
    args = parser.parse_args(argv)
    calib_size, per_class, held_count, fidelity = (32, 20, 100, 2) if args.quick else (128, 50, 200, 4)
    rounds = {1: 10, 8: 4} if args.quick else {1: 30, 8: 10}
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    WORK.mkdir(parents=True, exist_ok=True)
    cpu = cpu_features()
    fp32 = run.export_model(run.WORK / "vit_s14_dinov2_cifar10.onnx")
    pre = Preprocess.from_model(onnx.load(str(fp32), load_external_data=False))
    calib_files, held_files = run.split_imagenet(calib_size, held_count, 0)
    calib_dir = run.link_folder(calib_files, run.WORK / f"calib{calib_size}")
    cifar, labels = run.cifar_subset(per_class, pre)
    held = run.image_arrays(held_files, pre)
    models = build_models(fp32, calib_dir, run.image_arrays(calib_files, pre), calib_size, log, args.reuse)

    reference = {"cifar": run.run_model(fp32, cifar), "imagenet": run.run_model(fp32, held)}
    for name, entry in models.items():
        if name == "fp32":
            continue
        entry["cifar"] = output_metrics(reference["cifar"], run.run_model(entry["path"], cifar), labels)
        entry["imagenet_heldout"] = output_metrics(reference["imagenet"], run.run_model(entry["path"], held))
        entry["kernel_fidelity"] = layer_fidelity(entry["path"], held[:fidelity])
        entry["kernels"] = kernel_report(entry["path"])
        log(f"{name}: top-1 {entry['cifar']['top1']:.4f}, worst layer kernel SQNR "
            f"{entry['kernel_fidelity']['worst_db']:.1f} dB ({entry['kernel_fidelity']['worst_layer']})")
    models["fp32"]["cifar"] = output_metrics(reference["cifar"], reference["cifar"], labels)
    latency = {}
    for batch, count in rounds.items():
        stats = latency_round_robin({n: models[n]["path"] for n in TIMED}, cifar[:batch], rounds=count)
        latency[f"batch{batch}"] = stats
        log(f"batch {batch}: " + ", ".join(f"{n} {s['median_ms']:.1f} ms" for n, s in stats.items()))
    results = {
        "machine": run.machine(), "cpu": cpu.to_dict(), "latency": latency, "finished": time.time(),
        "rows": [n for n in TIMED if n != "fp32"], "same_plan": SAME_PLAN,
        "settings": {"calib_size": calib_size, "cifar_images": len(cifar), "imagenet_eval": len(held),
                     "kernel_check_images": fidelity, "latency_rounds": rounds},
        "models": {n: {k: (str(v) if isinstance(v, Path) else v) for k, v in e.items()} for n, e in models.items()},
    }
    slug = run.cpu_slug(cpu.kind)
    path = run.RESULTS / f"cpu_exact_{slug}{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps(results, indent=1, sort_keys=True, default=run.plain) + "\n")
    from table import cpu_markdown

    print(cpu_markdown(results, path.relative_to(run.ROOT)))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
