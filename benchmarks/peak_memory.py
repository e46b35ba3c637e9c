"""Run one ``nq-onnx`` command and report its own peak resident memory (``VmHWM``) as JSON on the last line.

``ru_maxrss`` of a child is useless when the parent is large: Linux carries the parent's high-water mark across
fork and exec. ``VmHWM`` in ``/proc/self/status`` belongs to the process's current address space only.
"""

from __future__ import annotations

import json
import sys

from nq_onnx.cli import main


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


if __name__ == "__main__":
    code = main(sys.argv[1:])
    print(json.dumps({"exit": code, "peak_rss_mb": peak_rss_mb()}))
    sys.exit(code)
