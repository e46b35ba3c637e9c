"""Where a sweep's tasks run: in this process one after another, or as Ray tasks on a local or remote cluster.

Both executors have the same four operations (``put`` a shared value, ``submit`` a task, ``wait`` for one to
finish, ``result`` of a finished one), so the sweep's logic is one loop, tested without Ray by the serial one.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import Any, Callable

from nq_onnx.core.errors import ConfigError, NQError

RAY_MISSING = "the sweep runs its trials on Ray, which is not installed: pip install 'nq-onnx[sweep]' (or pass --local)"


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one task asks of a node: CPUs and memory (bytes; Ray's scheduler caps each node's tasks by it)."""

    cpus: int = 1
    memory: int = 0


@dataclasses.dataclass(eq=False)  # hashed by identity, as Ray's references are
class Done:
    """A finished task of the serial executor: its value, or the exception it raised."""

    value: Any = None
    error: BaseException | None = None


class SerialExecutor:
    """Every task runs at once, in this process, when submitted."""

    name = "serial"
    slots = 1  # trials in flight
    workers = 1

    def put(self, value: Any) -> Any:
        return value

    def submit(self, fn: Callable, args: tuple, resources: Resources) -> Done:
        try:
            return Done(fn(*args))
        except Exception as exc:  # a trial's bug is recorded with the trial; the sweep goes on
            return Done(error=exc)

    def wait(self, pending: list) -> Any:
        return pending[0]

    def result(self, done: Done) -> Any:
        if done.error is not None:
            raise done.error
        return done.value

    def close(self) -> None:
        pass


class RayExecutor:
    """Ray tasks: a local Ray on this machine's cores (``address=None``), or the cluster at ``address``."""

    name = "ray"

    def __init__(self, address: str | None, cpus_per_trial: int, num_cpus: int | None = None) -> None:
        ray = import_ray()
        if address not in (None, "auto"):
            check_reachable(address)
        kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        try:
            if address is None:
                ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)  # never a stale one
            else:
                ray.init(address=address, **kwargs)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError or a bare Exception here
            ray.shutdown()  # what a failed start left running
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            where = f"join the Ray cluster at {address}" if address else "start a local Ray (or pass --local)"
            raise NQError(f"cannot {where}: {first}") from None
        self.ray = ray
        self.workers = int(ray.cluster_resources().get("CPU", 1))
        self.slots = max(1, self.workers // cpus_per_trial)
        self._remote: dict[Callable, Any] = {}

    def put(self, value: Any) -> Any:
        return self.ray.put(value)

    def submit(self, fn: Callable, args: tuple, resources: Resources) -> Any:
        if fn not in self._remote:
            self._remote[fn] = self.ray.remote(max_retries=0)(fn)  # a failed trial is recorded, not retried
        options = {"num_cpus": resources.cpus}
        if resources.memory:
            options["memory"] = resources.memory
        return self._remote[fn].options(**options).remote(*args)

    def wait(self, pending: list) -> Any:
        ready, _ = self.ray.wait(pending, num_returns=1)
        return ready[0]

    def result(self, ref: Any) -> Any:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            raise (exc.cause if isinstance(exc.cause, BaseException) else exc) from None

    def close(self) -> None:
        self.ray.shutdown()


def import_ray():
    try:
        import ray
    except ImportError:
        raise NQError(RAY_MISSING) from None
    return ray


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A cluster address that does not answer is a one-line error now, not Ray's retries for a minute."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address must be HOST:PORT (or auto), got {address!r}")
    refused = connection_error(host, int(port), timeout)
    if refused is not None:
        raise ConfigError(f"no Ray cluster answers at {address}: {refused.strerror or refused}")


def connection_error(host: str, port: int, timeout: float) -> OSError | None:
    """``None`` when something accepts a connection at ``host:port`` within ``timeout`` seconds, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc
