"""A sweep's trials converted again by hand: each trial's ``nq-onnx convert`` command line (the one ``--pick`` writes
for a chosen trial) run alone, in a fresh process, and the model's SHA-256 compared with the trial's.

    python benchmarks/sweep_bytes.py benchmarks/sweeps/methods.toml --seeds 0

Writes ``<sweep out>/bytes_check.json``: per trial, its command line, both digests and whether they match, with
the machine it ran on (the file's, or the row's own where another machine checked it). Resumes: a trial already
checked is not converted again; one whose conversion failed (its error recorded) is tried again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent

from run import machine, plain  # noqa: E402

from nq_onnx.core.config import QuantConfig  # noqa: E402
from nq_onnx.core.atomic import write_bytes_atomic  # noqa: E402
from nq_onnx.sweep.report import blas_env, command_line  # noqa: E402
from nq_onnx.sweep.results import ResultsFile  # noqa: E402
from nq_onnx.sweep.spec import load_spec  # noqa: E402


def reconvert(trial: dict, model: str, calib: str, scratch: Path) -> dict:
    """Run ``trial``'s command line in a fresh process and compare the model it writes with the trial's."""
    output = scratch / f"{trial['trial']}.onnx"
    config, blas = QuantConfig.from_dict(trial["config"]), (trial.get("worker") or {}).get("blas")
    words = shlex.split(command_line(model, calib, str(output), config))
    env = os.environ | blas_env(blas)  # the BLAS settings the trial ran under, as the shown command sets them
    words[0:1] = [str(Path(sys.executable).with_name("nq-onnx"))] if words[0] == "nq-onnx" else [sys.executable]
    started = time.perf_counter()
    done = subprocess.run(words + (["-q"] if words[1] == "convert" else []), capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    shown = command_line(*(os.path.relpath(p, ROOT) for p in (model, calib)), output.name, config,
                         blas)  # as run, with paths from the repository root
    if done.returncode != 0:
        return {"command": shown, "error": done.stderr.strip().splitlines()[-1:], "match": False}
    digest = hashlib.sha256(output.read_bytes()).hexdigest()
    output.unlink()
    return {"command": shown, "sweep_sha256": trial["sha256"], "alone_sha256": digest,
            "match": digest == trial["sha256"], "convert_s": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="the sweep file")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds to check (default: every seed)")
    args = parser.parse_args(argv)
    spec = load_spec(args.sweep)
    results = ResultsFile(spec.out / "results.jsonl")
    seeds = None if args.seeds is None else {int(s) for s in args.seeds.split(",")}
    todo = [t for t in results.trials.values() if t["status"] == "ok" and (seeds is None or t["seed"] in seeds)]
    path = spec.out / "bytes_check.json"
    here = machine()
    checked = json.loads(path.read_text()) if path.exists() else {"machine": here, "trials": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for n, trial in enumerate(todo, 1):
            if "error" not in checked["trials"].get(trial["trial"], {"error": None}):
                continue
            checked["trials"][trial["trial"]] = row = reconvert(trial, str(spec.model), str(spec.calib), Path(scratch))
            if here != checked["machine"]:  # a row checked on another machine than the file's names its own
                row["machine"] = here
            write_bytes_atomic(path, (json.dumps(checked, indent=1, sort_keys=True, default=plain) + "\n").encode())
            verdict = f"failed: {row['error']}" if "error" in row else "same bytes" if row["match"] else "DIFFERENT"
            print(f"[{n}/{len(todo)}] {trial['trial']}: {verdict}", flush=True)
    mismatched = [k for k, v in checked["trials"].items() if not v["match"]]
    print(f"{len(checked['trials']) - len(mismatched)} of {len(checked['trials'])} trials give the same bytes alone")
    return 1 if mismatched else 0


if __name__ == "__main__":
    raise SystemExit(main())
