"""What the in-memory graph costs a conversion: the seconds a default conversion of the real ViT-S/14 spends turning
ONNX protos into onnx-graphsurgeon graphs and back, and one such round trip against onnx-ir's (the ONNX project's
own in-memory IR) on the same model.

Every graph rewrite of a conversion works on an onnx-graphsurgeon graph, and onnxruntime (calibration, the search's
simulation, evaluation) needs a proto; so the model goes proto -> graph -> proto several times. This measures how
many times and for how long (``onnx_graphsurgeon.import_onnx`` / ``export_onnx`` wrapped during the conversion), and
what onnx-ir's ``deserialize_model`` / ``serialize_model`` take for the same round trip.

    python benchmarks/ir_cost.py          # needs onnx-ir (pip install onnx-ir); writes results/ir_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx  # noqa: E402
import onnx_graphsurgeon as gs  # noqa: E402

from run import RESULTS, WORK, export_model, link_folder, machine, split_imagenet  # noqa: E402

REPEATS = 5


def counted(seconds: dict[str, list[float]], name: str, function):
    """``function``, recording each call's wall seconds under ``name``."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds.setdefault(name, []).append(time.perf_counter() - start)
    return wrapper


def conversion(model: Path, calib: Path, out: Path) -> dict:
    """A default conversion (no evaluation) with graphsurgeon's import and export timed call by call."""
    from nq_onnx import convert

    seconds: dict[str, list[float]] = {}
    originals = gs.import_onnx, gs.export_onnx
    gs.import_onnx, gs.export_onnx = (counted(seconds, "import", originals[0]),
                                      counted(seconds, "export", originals[1]))
    try:
        start = time.perf_counter()
        convert(model, out, calib, evaluate=False, force=True)
        total = time.perf_counter() - start
    finally:
        gs.import_onnx, gs.export_onnx = originals
    return {"convert_s": total, **{f"gs_{k}": {"calls": len(v), "seconds": sum(v)} for k, v in seconds.items()}}


def round_trips(model: onnx.ModelProto) -> dict:
    """The median seconds of one proto -> graph -> proto round trip with each library, on the same model."""
    import onnx_ir as ir

    def median(run) -> float:
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return {"repeats": REPEATS, "onnx_ir": ir.__version__, "onnx_graphsurgeon": gs.__version__,
            "graphsurgeon_s": median(lambda: gs.export_onnx(gs.import_onnx(model))),
            "onnx_ir_s": median(lambda: ir.serde.serialize_model(ir.serde.deserialize_model(model)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "ir_cost.json")
    args = parser.parse_args()
    model = export_model(WORK / "vit_s14_dinov2_cifar10.onnx")
    calib = link_folder(split_imagenet(128, 0, 0)[0], WORK / "calib128")
    record = {"machine": machine(), "model": model.name, "calib_images": 128, "load_before": os.getloadavg()[0]}
    record["conversion"] = conversion(model, calib, WORK / "ir_cost.onnx")
    from nq_onnx.pipeline import canonicalize

    record["round_trip"] = round_trips(canonicalize(onnx.load(str(model))))
    record["load_after"] = os.getloadavg()[0]
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "machine"}, indent=1))


def markdown(data: dict, source: Path) -> str:
    """The graph round trips of one conversion and one round trip with each library, as a table."""
    conv, trip = data["conversion"], data["round_trip"]
    spent = conv["gs_import"]["seconds"] + conv["gs_export"]["seconds"]
    rows = ["| | calls | seconds | share of the conversion |", "|---|---|---|---|"]
    for what in ("import", "export"):
        entry = conv[f"gs_{what}"]
        rows.append(f"| graphsurgeon {what} in a default conversion | {entry['calls']} | {entry['seconds']:.2f} | "
                    f"{entry['seconds'] / conv['convert_s']:.1%} |")
    rows.append(f"| both | | {spent:.2f} | {spent / conv['convert_s']:.1%} of {conv['convert_s']:.1f} s |")
    cpu = data["machine"]["cpu"]
    return "\n".join(rows) + (
        f"\n\nOne round trip of the canonical model (proto -> graph -> proto, median of {trip['repeats']}): "
        f"onnx-graphsurgeon {trip['onnx_graphsurgeon']} {trip['graphsurgeon_s']:.3f} s, onnx-ir {trip['onnx_ir']} "
        f"{trip['onnx_ir_s']:.3f} s. ViT-S/14 ({data['model']}), {data['calib_images']} calibration images, "
        f"nq-onnx {data['machine']['nq_onnx']} defaults, no evaluation. CPU: {cpu.get('model') or 'unnamed'}, "
        f"{cpu['kind']}; one-minute load average {data['load_before']:.1f} before and {data['load_after']:.1f} after "
        f"(the machine has {data['machine']['cpus']} cores). Source: `{source}`.")


if __name__ == "__main__":
    main()
