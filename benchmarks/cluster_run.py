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
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import RESULTS, machine  # noqa: E402

SWEEPS = Path(__file__).resolve().parent / "sweeps"
TIMES = ("convert_s",)  # figures no two runs share


def trials(path: Path) -> list[dict]:
    """The last record of every succeeded trial of a sweep's results file."""
    last: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry["kind"] == "trial":
            last[entry["trial"]] = entry
    return [t for t in last.values() if t["status"] == "ok"]


def run_record(path: Path) -> dict:
    return [json.loads(line) for line in path.read_text().splitlines() if '"kind": "run"' in line][-1]


def compared(cluster: list[dict], one_node: list[dict]) -> list[dict]:
    """Each cluster trial beside the one-node trial of the same options: same model bytes, same figures."""
    by_options = {json.dumps(t["options"], sort_keys=True): t for t in one_node}
    rows = []
    for trial in cluster:
        twin = by_options.get(json.dumps(trial["options"], sort_keys=True))
        figures = {k: v for k, v in trial["metrics"].items() if k not in TIMES}
        rows.append({"options": trial["options"], "sha256": trial["sha256"], "convert_s": trial["convert"]["convert_s"],
                     "node": trial["worker"]["node"], "pid": trial["worker"]["pid"],
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
    one_node = load_spec(SWEEPS / "methods.toml").out / "results.jsonl"
    record = {"machine": machine(), "nodes": args.nodes, "cpus_per_node": 1,
              "sweep_file": "benchmarks/sweeps/cluster.toml", "cluster_start_s": started - begin,
              "sweep_s": swept - started, "run": run_record(spec.out / "results.jsonl"),
              "trials": compared(trials(spec.out / "results.jsonl"), trials(one_node) if one_node.exists() else [])}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "machine"}, indent=1))



def _label(options: dict) -> str:
    rest = " ".join(f"{k}={v}" for k, v in sorted(options.items()) if k not in ("method", "w_bits", "a_bits", "seed"))
    return f"W{options['w_bits']}A{options['a_bits']} {options['method']}, seed {options['seed']} ({rest})"


def _projection(data: dict, trials: int, machines: tuple[int, ...], cpus: int) -> list[str]:
    """The methods study's wall time on ``machines`` machines of ``cpus`` CPUs, from this run's figures."""
    run = data["run"]
    per_trial = run["trials_s"] * run["workers"] / run["trials_run"]  # worker-seconds per trial, evaluation included
    latency = run["latency_s"] / (run["trials_run"] + 1)  # per timed model (FP32 counted once)
    rows = ["| machines | workers | trials | conversion and evaluation | latency timing (one machine) | total |",
            "|---|---|---|---|---|---|"]
    for count in machines:
        workers = count * cpus
        compute = -(-trials // workers) * per_trial  # whole rounds of trials
        rows.append(f"| {count} | {workers} | {trials} | {compute / 60:.0f} min | {trials * latency / 60:.0f} min | "
                    f"{(compute + trials * latency) / 60:.0f} min |")
    return rows


def markdown(data: dict, source: Path) -> str:
    """The cluster run's trials beside the one-node run's, its times, and the projection to more machines."""
    rows = ["| trial | node | conversion (s, one CPU) | peak memory (MB) | model and figures as on one node |",
            "|---|---|---|---|---|"]
    for t in data["trials"]:
        same = {True: "the same (SHA-256 equal)", False: "**different**", None: "not run on one node"}[
            t["same_as_one_node"]]
        rows.append(f"| {_label(t['options'])} | {t['node']} (pid {t['pid']}) | {t['convert_s']:.0f} | "
                    f"{t['peak_rss_mb']:.0f} | {same} |")
    run, cpu = data["run"], data["machine"]["cpu"]
    per_trial = run["trials_s"] * run["workers"] / run["trials_run"]
    convert = sum(t["convert_s"] for t in data["trials"]) / len(data["trials"])
    return "\n".join(rows) + (
        f"\n\n{data['nodes']} Ray nodes of {data['cpus_per_node']} CPU started on one machine "
        f"({data['cluster_start_s']:.0f} s to start and join), {run['workers']} workers: {run['trials_run']} trials in "
        f"{run['trials_s']:.0f} s, FP32's reference evaluation included ({per_trial:.0f} worker-seconds per trial, "
        f"of which the conversion {convert:.0f} s and the rest the sharded evaluation of 2,000 CIFAR-10 and 200 "
        f"held-out ImageNet images), then latency timing of {run['trials_run']} models and "
        f"FP32 on the driver in {run['latency_s']:.0f} s. The one-node run is the same trials of "
        f"`benchmarks/sweeps/methods.toml` on one Ray node of two workers. Projected from these figures for the "
        f"methods study (81 trials) on machines like this one ({data['machine']['cpus']} CPUs, one trial per CPU):\n\n"
        + "\n".join(_projection(data, 81, (1, 2, 4, 8, 16), data["machine"]["cpus"]))
        + f"\n\nThe projection assumes every trial costs what these four W8A8 EasyQuant and NoisyQuant trials cost on "
        f"one CPU; the study's W6A6, twin-uniform and GPTQ rows cost more. CPU: {cpu.get('model') or 'unnamed'}, "
        f"{cpu['kind']}. Source: `{source}`.")


if __name__ == "__main__":
    main()
