"""Run the built-in demo (``nq-onnx demo``) and keep its figures for the README.

    python benchmarks/demo.py      # about 5 minutes on 2 cores

Writes ``benchmarks/results/demo.json`` (what ``nq-onnx demo`` writes beside its models); ``python
benchmarks/table.py --readme`` puts its paragraph into the README, so the figures quoted there are the ones the
demo printed, with the CPU they came from.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    from nq_onnx.demo import run_demo

    out = ROOT / "benchmarks" / "work" / "demo"
    print(run_demo(out))
    shutil.copyfile(out / "demo.json", ROOT / "benchmarks" / "results" / "demo.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
