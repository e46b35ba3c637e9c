"""The sweep's multi-node path on the real ViT-S/14: ``benchmarks/sweeps/cluster.toml`` (four trials of the methods
study) on a Ray cluster of two one-CPU nodes started on this machine, each trial's model compared with the same
trial of the methods sweep run on one node, and the times that the scaling figures are worked out from.

    python benchmarks/sweep_data.py      # once
    python benchmarks/cluster_run.py     # writes results/cluster_run.json; the sweep's own: results/sweep_cluster

Run it on an otherwise idle machine: the times are the point. A trial matches the one-node run when its options
are the same and the converted model's SHA-256 and every figure but the times are equal.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import RESULTS, machine  # noqa: E402

from nq_onnx.sweep.results import ResultsFile  # noqa: E402

SWEEPS = Path(__file__).resolve().parent / "sweeps"
TIMES = ("convert_s",)  # figures no two runs share


def trials(results: ResultsFile) -> list[dict]:
    """The last record of every succeeded trial of a sweep's results file."""
    return [t for t in results.trials.values() if t["status"] == "ok"]


def compared(cluster: list[dict], one_node: list[dict]) -> list[dict]:
    """Each cluster trial beside the one-node trial of the same options: same model bytes, same figures."""
    by_options = {json.dumps(t["options"], sort_keys=True): t for t in one_node}
    rows = []
    for trial in cluster:
        twin = by_options.get(json.dumps(trial["options"], sort_keys=True))
        figures = {k: v for k, v in trial["metrics"].items() if k not in TIMES}
        rows.append({"options": trial["options"], "sha256": trial["sha256"], "convert_s": trial["convert"]["convert_s"],
                     "node": trial["worker"]["node"], "node_id": trial["worker"].get("node_id"),
                     "pid": trial["worker"]["pid"],
                     "peak_rss_mb": trial["worker"]["peak_rss_mb"], "metrics": figures,
                     "one_node_sha256": twin["sha256"] if twin else None,
                     "same_as_one_node": None if twin is None else (
                         twin["sha256"] == trial["sha256"]
                         and {k: v for k, v in twin["metrics"].items() if k not in TIMES} == figures)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "cluster_run.json")
    args = parser.parse_args()
    from nq_onnx.sweep import run_sweep
    from nq_onnx.sweep.local_cluster import local_cluster
    from nq_onnx.sweep.spec import load_spec

    os.environ["RAY_AUTH_MODE"] = "disabled"  # the nodes started here run without token authentication
    spec = load_spec(SWEEPS / "cluster.toml")
    begin = time.perf_counter()
    with local_cluster(nodes=args.nodes, cpus_per_node=1) as address:
        started = time.perf_counter()
        run_sweep(spec.path, address=address)
        swept = time.perf_counter()
    cluster = ResultsFile(spec.out / "results.jsonl")
    one_node = ResultsFile(load_spec(SWEEPS / "methods.toml").out / "results.jsonl")
    record = {"machine": machine(), "nodes": args.nodes, "cpus_per_node": 1,
              "sweep_file": "benchmarks/sweeps/cluster.toml", "cluster_start_s": started - begin,
              "sweep_s": swept - started, "run": cluster.runs[-1],
              "trials": compared(trials(cluster), trials(one_node))}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "machine"}, indent=1))



def _label(options: dict) -> str:
    rest = " ".join(f"{k}={v}" for k, v in sorted(options.items()) if k not in ("method", "w_bits", "a_bits", "seed"))
    return f"W{options['w_bits']}A{options['a_bits']} {options['method']}, seed {options['seed']} ({rest})"


def study_trials(path: Path) -> int:
    """The trials of a sweep file: each grid table's combinations times the seeds (read with tomllib alone, so the
    docs render where the model and data are absent)."""
    data = tomllib.loads(path.read_text())
    tables = data.get("grid") or [{}]
    combos = sum(math.prod(len(v) if isinstance(v, list) else 1 for v in table.values()) for table in tables)
    return combos * len(data.get("seeds", [0]))


def _projection(data: dict, trials: int, machines: tuple[int, ...], cpus: int) -> list[str]:
    """A study's wall time on ``machines`` machines of ``cpus`` CPUs, from this run's figures: whole rounds of
    trials, then the latency timing on the driver (:data:`~nq_onnx.sweep.api.LATENCY_GROUP` trials and FP32 per
    group, each group costing what this run's did per model)."""
    from nq_onnx.sweep.api import LATENCY_GROUP

    run = data["run"]
    per_trial = run["trials_s"] * run["workers"] / run["trials_run"]  # worker-seconds per trial, evaluation included
    per_model = run["latency_s"] / (run["trials_run"] + -(-run["trials_run"] // LATENCY_GROUP))
    latency = (trials + -(-trials // LATENCY_GROUP)) * per_model
    rows = ["| machines | workers | trials | conversion and evaluation | latency timing (one machine) | total |",
            "|---|---|---|---|---|---|"]
    for count in machines:
        workers = count * cpus
        compute = -(-trials // workers) * per_trial
        rows.append(f"| {count} | {workers} | {trials} | {compute / 60:.0f} min | {latency / 60:.0f} min | "
                    f"{(compute + latency) / 60:.0f} min |")
    return rows


def markdown(data: dict, source: Path) -> str:
    """The cluster run's trials beside the one-node run's, its times, and the projection to more machines."""
    rows = ["| trial | node | conversion (s, one CPU) | peak memory (MB) | model and figures as on one node |",
            "|---|---|---|---|---|"]
    nodes = {node_id: i + 1 for i, node_id in enumerate(dict.fromkeys(t.get("node_id") for t in data["trials"]))}
    for t in data["trials"]:
        same = {True: "the same (SHA-256 equal)", False: "**different**", None: "not run on one node"}[
            t["same_as_one_node"]]
        node = f"{t['node']}, node {nodes[t['node_id']]}" if t.get("node_id") else f"{t['node']} (pid {t['pid']})"
        rows.append(f"| {_label(t['options'])} | {node} | {t['convert_s']:.0f} | "
                    f"{t['peak_rss_mb']:.0f} | {same} |")
    if not data["trials"]:
        return "\n".join(rows) + f"\n\nNo trial succeeded. Source: `{source}`."
    run, cpu = data["run"], data["machine"]["cpu"]
    per_trial = run["trials_s"] * run["workers"] / run["trials_run"]
    convert = sum(t["convert_s"] for t in data["trials"]) / len(data["trials"])
    study = study_trials(SWEEPS / "methods.toml")
    return "\n".join(rows) + (
        f"\n\n{data['nodes']} Ray nodes of {data['cpus_per_node']} CPU started on one machine "
        f"({data['cluster_start_s']:.0f} s to start and join), {run['workers']} workers: {run['trials_run']} trials in "
        f"{run['trials_s']:.0f} s, FP32's reference evaluation included ({per_trial:.0f} worker-seconds per trial, "
        f"of which the conversion {convert:.0f} s and the rest the sharded evaluation on `{data['sweep_file']}`'s "
        f"evaluation sets), then latency timing of {run['trials_run']} models and FP32 on the driver in "
        f"{run['latency_s']:.0f} s. The one-node run is the same trials of `benchmarks/sweeps/methods.toml` on one "
        f"Ray node. Projected from these figures for the methods study ({study} trials) on machines like this one "
        f"({data['machine']['cpus']} CPUs, one trial per CPU):\n\n"
        + "\n".join(_projection(data, study, (1, 2, 4, 8, 16), data["machine"]["cpus"]))
        + f"\n\nThe projection assumes every trial costs what these {len(data['trials'])} trials cost on one CPU; "
        f"the study's W6A6, twin-uniform and GPTQ rows cost more. Both nodes run on one machine and share its "
        f"address. CPU: {cpu.get('model') or 'unnamed'}, {cpu['kind']}. "
        f"Source: `{source}`.")

if __name__ == "__main__":
    main()
