"""``nq-onnx sweep``: convert and evaluate a grid of configurations, resumably, on Ray; time them; pick one.

    from nq_onnx.sweep import Choice, run_sweep
    result = run_sweep("vit.toml", choice=Choice("top1 >= fp32 - 0.3", "latency_ms"))

A trial is one ``nq_onnx.convert`` in a Ray worker followed by its evaluation, sharded: each shard is a task that
opens one onnxruntime session (one thread) on its slice of the evaluation set and returns the model's outputs, which
the driver joins and scores against FP32's. Workers are reused across trials: a fresh process per conversion costs
a Python start and the imports each time, and on a heavily loaded machine that start outlasted Ray's worker
registration timeout, so Ray kept restarting workers and the sweep stalled. Latency is timed
afterwards, on the driver's machine, with no trial running, each group of models interleaved with FP32.

Why Ray Core tasks and not Ray Tune: the grid is fixed and small (tens of trials, each minutes long), there is no
search algorithm or early stopping to drive, and a sweep's state must be a results file that re-running resumes and
that a trial run by hand reproduces byte for byte. Tune would add its own trial directories, checkpoints and
experiment state beside that file; three remote functions and ``ray.wait`` are all the sweep needs.

Why tasks over shards and not Ray Data: an evaluation set is a list of files (or one ``.npz``) read once per model;
Ray Data's streaming executor and its actor pools pay off on data pipelines larger than memory with several
stages, while here a shard task is a session plus a loop, identical to the serial path (same batches from the same
starts, hence the same outputs to the bit). The shared values (the evaluation set's description, the preprocessing)
go through the object store once (``ray.put``); the model, the calibration data and the converted models are read
and written by path, which on a cluster must be a shared folder.

Without Ray (``local=True``, ``nq-onnx sweep --local``) the same loop runs every task in this process, one after
another: the sweep's logic is tested without Ray, and a machine without Ray can still sweep.
"""

from nq_onnx.sweep.api import Choice, SweepResult, run_sweep
from nq_onnx.sweep.pick import METRICS, choose, parse_pick, pareto_front
from nq_onnx.sweep.spec import SweepSpec, Trial, load_spec

__all__ = ["METRICS", "Choice", "SweepResult", "SweepSpec", "Trial", "choose", "load_spec", "parse_pick",
           "pareto_front", "run_sweep"]
