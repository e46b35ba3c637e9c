"""A Ray cluster of several nodes on this machine, for trying the multi-node path of ``nq-onnx sweep --address``
without a second machine: ``ray start --head`` and ``ray start --address`` for each further node, each with its own
CPUs, all on 127.0.0.1, stopped (with every process they started) on leaving the ``with`` block.

    with local_cluster(nodes=2, cpus_per_node=1) as address:
        sweep("vit.toml", address=address)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from nq_onnx.core.errors import ConfigError
from nq_onnx.sweep.executors import connection_error

START_SECONDS = 60


@contextlib.contextmanager
def local_cluster(nodes: int = 2, cpus_per_node: int = 1) -> Iterator[str]:
    """Start ``nodes`` Ray nodes of ``cpus_per_node`` CPUs here; yield the head's address once all have joined."""
    if nodes < 1 or cpus_per_node < 1:
        raise ConfigError(f"a local Ray cluster needs at least 1 node of at least 1 CPU, got {nodes} of "
                          f"{cpus_per_node}")
    ray_cli = Path(sys.executable).parent / "ray"
    if not ray_cli.exists():
        raise ConfigError("a local Ray cluster needs Ray (pip install 'nq-onnx[sweep]')")
    port, started = free_port(), []
    common = ["--num-cpus", str(cpus_per_node), "--node-ip-address", "127.0.0.1", "--block",
              "--disable-usage-stats"]
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    try:
        started.append(_start([ray_cli, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                               *common], env))
        _wait_for_port(port)
        for _ in range(nodes - 1):
            started.append(_start([ray_cli, "start", "--address", f"127.0.0.1:{port}", *common], env))
        wait_for_cpus(f"127.0.0.1:{port}", nodes * cpus_per_node, env)
        yield f"127.0.0.1:{port}"
    finally:
        for node in reversed(started):
            _stop(node)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(command: list, env: dict) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def wait_for_cpus(address: str, cpus: int, env: dict, seconds: float = START_SECONDS) -> None:
    """Until the cluster at ``address`` has ``cpus`` CPUs: a node joins a few seconds after the head."""
    probe = (f"import ray; ray.init(address='{address}', log_to_driver=False); "
             "print(int(ray.cluster_resources().get('CPU', 0)))")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:  # the head not answering yet: ask again
            continue
        if out.stdout.strip().splitlines()[-1:] == [str(cpus)]:
            return
        time.sleep(1)
    raise RuntimeError(f"the local Ray cluster at {address} did not reach {cpus} CPUs in {seconds:.0f} s")


def _wait_for_port(port: int, seconds: float = START_SECONDS) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if connection_error("127.0.0.1", port, timeout=1) is None:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the Ray head did not listen on port {port} in {seconds:.0f} s")


def _stop(node: subprocess.Popen) -> None:
    """End a node started here: its process group (``ray start --block`` and the Ray processes it spawned)."""
    try:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
        node.wait()
