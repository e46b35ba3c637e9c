"""nq-onnx sweep: the sweep file's validation, resuming, failed trials, exactness against a hand conversion,
picking and the Pareto front; the same sweep through Ray on one node and on two."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import nq_onnx
from conftest import image_model, save
from nq_onnx.cli import build_parser, main
from nq_onnx.cli.main import _config_from
from nq_onnx.core.errors import ConfigError
from nq_onnx.sweep import Choice, choose, load_spec, parse_pick, pareto_front, run_sweep
from nq_onnx.sweep.executors import check_reachable
from nq_onnx.sweep.report import command_line
from nq_onnx.sweep.results import ResultsFile

GRID = """
[grid]
method = ["minmax", "easyquant"]
w_bits = [8, 6]
calib_size = 8
search_images = 2
holdout_images = 1
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, photo_folder) -> Path:
    """A tiny image classifier, real photographs to calibrate on, a labelled .npz of uint8 pictures."""
    folder = tmp_path_factory.mktemp("sweep_inputs")
    rng = np.random.default_rng(0)
    save(image_model(rng), folder / "model.onnx")
    np.savez(folder / "labelled.npz", images=rng.integers(0, 255, (40, 8, 8, 3), dtype=np.uint8),
             labels=rng.integers(0, 10, 40))
    shutil.copytree(photo_folder, folder / "photos")
    return folder


def sweep_file(folder: Path, inputs: Path, grid: str = GRID, seeds: str = "[0]", extra: str = "",
               name: str = "s.toml") -> Path:
    text = f"""model = "{inputs / 'model.onnx'}"
calib = "{inputs / 'photos'}"
seeds = {seeds}
{extra}
[eval]
labelled = "{inputs / 'labelled.npz'}"
heldout = "{inputs / 'photos'}"
shard_size = 16

[latency]
rounds = 2
{grid}"""
    path = folder / name
    path.write_text(text)
    return path


def trial_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "trial"]


BAD_FILES = [
    ("unknown option", GRID + "w_bitz = [8]\n", "unknown grid option 'w_bitz'"),
    ("empty grid", "[grid]\n", "the grid is empty"),
    ("no grid", "", "the grid is empty"),
    ("empty list", "[grid]\nw_bits = []\n", "grid option 'w_bits' has no values"),
    ("bad value", "[grid]\nw_bits = [8, 3]\n", "grid option 'w_bits': w-bits must be one of 4, 5, 6, 7, 8, got 3"),
    ("wrong type", "[grid]\nreparam = \"yes\"\n", "grid option 'reparam': 'yes' is not a boolean"),
    ("seed in grid", "[grid]\nseed = [0, 1]\n", "give seeds as the top-level seeds list"),
    ("unknown method", "[grid]\nmethod = [\"noisy\"]\n", "unknown method 'noisy'"),
]


@pytest.mark.parametrize("name, grid, message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_sweep_file_is_one_line_and_writes_nothing(tmp_path, inputs, capsys, name, grid, message):
    path = sweep_file(tmp_path, inputs, grid)
    assert main(["sweep", str(path), "--local"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nq-onnx: error: s.toml: ") and message in err, err
    assert not (tmp_path / "s.sweep").exists()


@pytest.mark.parametrize("eval_lines, message", [
    ("limit = 10\nper_class = 2\n", "give eval.limit or eval.per_class, not both"),
    ("per_class = 0\n", "eval.per_class must be at least 1"),
])
def test_a_bad_choice_of_evaluation_inputs_is_one_line_and_writes_nothing(tmp_path, inputs, capsys, eval_lines,
                                                                         message):
    path = sweep_file(tmp_path, inputs)
    path.write_text(path.read_text().replace("[eval]\n", "[eval]\n" + eval_lines))
    assert main(["sweep", str(path), "--local"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "s.sweep").exists()


def test_per_class_takes_the_first_inputs_of_each_class_in_source_order(tmp_path, inputs):
    """The balanced choice a study states as "the first N test images of every class"."""
    from nq_onnx.sweep.evalset import open_eval_set

    model = onnx.load(inputs / "model.onnx")
    labels = np.load(inputs / "labelled.npz")["labels"]
    chosen = open_eval_set(inputs / "labelled.npz", model, None, labelled=True, per_class=2)
    expected = sorted(i for c in set(labels.tolist()) for i in np.flatnonzero(labels == c)[:2].tolist())
    assert list(chosen.indices) == expected and list(chosen.labels) == labels[expected].tolist()
    assert len(open_eval_set(inputs / "labelled.npz", model, None, labelled=True, per_class=100)) == len(labels)
    path = sweep_file(tmp_path, inputs, GRID.replace('["minmax", "easyquant"]', '"minmax"').replace("[8, 6]", "8"))
    path.write_text(path.read_text().replace("[eval]\n", "[eval]\nper_class = 2\n"))
    assert load_spec(path).per_class == 2
    assert main(["sweep", str(path), "--local", "-q"]) == 0
    header = ResultsFile(tmp_path / "s.sweep" / "results.jsonl").header
    assert header["identity"]["per_class"] == 2 and header["identity"]["limit"] is None


def test_missing_or_absent_evaluation_set_is_refused(tmp_path, inputs, capsys):
    path = sweep_file(tmp_path, inputs)
    path.write_text(path.read_text().replace(str(inputs / "labelled.npz"), str(tmp_path / "nowhere.npz")))
    assert main(["sweep", str(path), "--local"]) == 2
    assert f"labelled evaluation set not found: {tmp_path / 'nowhere.npz'}" in capsys.readouterr().err
    path.write_text(path.read_text().replace(str(tmp_path / "nowhere.npz"), str(inputs / "labelled.npz")))
    (tmp_path / "empty").mkdir()
    path.write_text(path.read_text().replace(f'calib = "{inputs / "photos"}"', f'calib = "{tmp_path / "empty"}"'))
    assert main(["sweep", str(path), "--local"]) == 2
    assert f"no images in {tmp_path / 'empty'}" in capsys.readouterr().err
    text = path.read_text()
    path.write_text(text[:text.index("[eval]")] + text[text.index("[latency]"):])
    assert main(["sweep", str(path), "--local"]) == 2
    assert "no evaluation set: give [eval] labelled" in capsys.readouterr().err
    assert not (tmp_path / "s.sweep").exists()


@pytest.mark.parametrize("argv, message", [
    (["--pick", "top5 >= fp32 - 1", "--minimize", "latency_ms"], "unknown metric 'top5'"),
    (["--pick", "top1 >= fp32 - 1"], "--pick needs --minimize METRIC or --maximize METRIC"),
    (["--minimize", "speed"], "unknown metric 'speed' to optimize"),
    (["--pick", "top1 >= fp32 -", "--maximize", "top1"], "ends too early"),
    (["--pick", "top1 >= fp32 ; rm", "--maximize", "top1"], "cannot read '; rm'"),
])
def test_bad_pick_is_one_line_and_writes_nothing(tmp_path, inputs, capsys, argv, message):
    path = sweep_file(tmp_path, inputs)
    assert main(["sweep", str(path), "--local", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "s.sweep").exists()


def test_pick_of_a_metric_the_sweep_does_not_measure(tmp_path, inputs, capsys):
    path = sweep_file(tmp_path, inputs)
    path.write_text(path.read_text().replace("rounds = 2", "rounds = 0"))
    assert main(["sweep", str(path), "--local", "--minimize", "latency_ms"]) == 2
    assert "this sweep does not measure 'latency_ms'" in capsys.readouterr().err
    assert not (tmp_path / "s.sweep").exists()


def test_unreachable_address_is_one_line_before_anything(tmp_path, inputs, capsys):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConfigError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        check_reachable(f"127.0.0.1:{port}", timeout=2)
    with pytest.raises(ConfigError, match="--address must be HOST:PORT"):
        check_reachable("nowhere")
    pytest.importorskip("ray", reason="the CLI path needs Ray installed (pip install 'nq-onnx[sweep]')")
    path = sweep_file(tmp_path, inputs)
    assert main(["sweep", str(path), "--address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no Ray cluster answers at 127.0.0.1:{port}" in err
    assert not (tmp_path / "s.sweep").exists()


def test_without_ray_the_error_names_the_extra_and_local_still_runs(tmp_path, inputs, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError, as where it is not installed
    path = sweep_file(tmp_path, inputs, GRID.replace('["minmax", "easyquant"]', '"minmax"').replace("[8, 6]", "8"))
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'nq-onnx[sweep]' (or pass --local)" in err
    assert not (tmp_path / "s.sweep").exists()
    assert main(["sweep", str(path), "--local", "-q"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sweep s.toml: 1 trials succeeded, 0 failed; results in ")
    assert ResultsFile(tmp_path / "s.sweep" / "results.jsonl").runs[-1]["executor"] == "serial"


def test_sweep_resumes_and_records_failed_trials(tmp_path, inputs):
    grid = GRID + 'exclude = [[], ["/nothing/*"]]\nbits_budget = ["none", 6.0]\n'
    grid = grid.replace('method = ["minmax", "easyquant"]', 'method = ["minmax"]').replace("[8, 6]", "[8]")
    path = sweep_file(tmp_path, inputs, grid)
    lines: list[str] = []
    first = run_sweep(path, local=True, progress=lines.append)
    assert [line.split(":")[0] for line in lines[:5]] == ["sweep s.toml", "[1/4] exclude=[] bits_budget=none",
                                                         "[2/4] exclude=[] bits_budget=6.0",
                                                         "[3/4] exclude=[/nothing/*] bits_budget=none",
                                                         "[4/4] exclude=[/nothing/*] bits_budget=6.0"]
    assert len(first.records) == 1 and len(first.failed) == 3
    errors = sorted(r["error"] for r in first.failed)
    assert errors[0].startswith("bits-budget needs a searched method"), errors  # refused by the configuration
    assert "/nothing/*" in errors[-1] and "matches no layer" in errors[-1], errors  # refused by the conversion
    assert "left" in lines[1] and "failed: bits-budget needs a searched method" in lines[2]
    before = (tmp_path / "s.sweep" / "results.jsonl").read_bytes()
    again: list[str] = []
    second = run_sweep(path, local=True, progress=again.append)
    assert again[0] == "sweep s.toml: 4 trials, 0 to run on 1 serial worker(s)"
    assert [r["sha256"] for r in second.records] == [r["sha256"] for r in first.records]
    after = (tmp_path / "s.sweep" / "results.jsonl").read_bytes()
    assert after.startswith(before) and after[len(before):].count(b"\n") == 1  # only this run's "run" line
    with open(tmp_path / "s.sweep" / "results.jsonl", "ab") as f:  # an interrupted write: a torn last line
        f.write(b'{"kind": "trial", "tri')
    path.write_text(path.read_text().replace("seeds = [0]", "seeds = [0, 1]"))
    third: list[str] = []
    run_sweep(path, local=True, progress=third.append)
    assert third[0] == "sweep s.toml: 8 trials, 4 to run on 1 serial worker(s)"
    assert len(trial_lines(tmp_path / "s.sweep")) == 8  # the torn line was cut off, every line reads


def test_a_resumed_sweep_reads_fp32s_outputs_instead_of_evaluating_it_again(tmp_path, inputs, monkeypatch):
    """FP32's outputs are kept beside the results under what they depend on; run again, the sweep reads them (the
    same figures), and evaluates FP32 anew only when that changes (here, another onnxruntime)."""
    import nq_onnx.sweep.run as sweep_run

    path = sweep_file(tmp_path, inputs)
    first = run_sweep(path, local=True)
    cache = tmp_path / "s.sweep" / "fp32_outputs.npz"
    assert cache.exists()
    evaluated: list[str] = []
    real = sweep_run.evaluate_model

    def counted(executor, model, *rest):
        evaluated.append(Path(model).name)
        return real(executor, model, *rest)

    monkeypatch.setattr(sweep_run, "evaluate_model", counted)
    second = run_sweep(path, local=True)
    assert evaluated == [] and second.fp32 == first.fp32  # nothing to run, FP32 not evaluated
    monkeypatch.setattr("onnxruntime.__version__", "0.0.0")
    third = run_sweep(path, local=True)
    assert evaluated == ["model.onnx"] and third.fp32 == first.fp32  # another key: FP32 evaluated again
    cache.write_bytes(b"not an npz")
    run_sweep(path, local=True)
    assert evaluated == ["model.onnx", "model.onnx"]  # an unreadable file: evaluated again, and rewritten
    with np.load(cache) as stored:
        assert set(stored.files) == {"key", "outputs.labelled", "outputs.heldout"}


def test_results_of_another_model_are_not_resumed(tmp_path, inputs, capsys):
    path = sweep_file(tmp_path, inputs, GRID.replace('["minmax", "easyquant"]', '["minmax"]').replace("[8, 6]", "8"))
    run_sweep(path, local=True)
    other = tmp_path / "other.onnx"
    save(image_model(np.random.default_rng(1)), other)
    path.write_text(path.read_text().replace(str(inputs / "model.onnx"), str(other)))
    before = (tmp_path / "s.sweep" / "results.jsonl").read_bytes()
    assert main(["sweep", str(path), "--local"]) == 2
    assert "belongs to another sweep (model_sha256 differs" in capsys.readouterr().err
    assert (tmp_path / "s.sweep" / "results.jsonl").read_bytes() == before


def test_trial_model_is_the_hand_conversion_byte_for_byte(tmp_path, inputs):
    path = sweep_file(tmp_path, inputs, GRID.replace('["minmax", "easyquant"]', '"noisyquant"'), seeds="[3]")
    result = run_sweep(path, local=True)
    assert len(result.records) == 2
    for trial, record in zip(load_spec(path).trials(), result.records):
        hand = tmp_path / f"hand_{trial.key}.onnx"
        nq_onnx.convert(inputs / "model.onnx", hand, inputs / "photos", trial.config)
        digest = hashlib.sha256(hand.read_bytes()).hexdigest()
        assert record["sha256"] == digest == hashlib.sha256((tmp_path / "s.sweep" / record["model"]).read_bytes()
                                                            ).hexdigest()
        assert record["config"]["seed"] == 3 and record["worker"]["cpu"]["kind"] and record["worker"]["versions"]
    assert result.records[0]["sha256"] != result.records[1]["sha256"]  # W8 and W6 differ: the check can fail


def test_pick_writes_the_chosen_model_its_command_and_the_report(tmp_path, inputs):
    path = sweep_file(tmp_path, inputs)
    result = run_sweep(path, local=True, choice=Choice("top1 >= fp32 - 100 and mse <= fp32.mse + 1", "mse"))
    best = min(result.records, key=lambda r: r["metrics"]["mse"])
    assert result.chosen is best
    out = tmp_path / "s.sweep"
    assert (out / "picked.onnx").read_bytes() == (out / best["model"]).read_bytes()
    words = shlex.split((out / "picked.txt").read_text())
    while "=" in words[0]:  # the BLAS settings the trial ran under
        words.pop(0)
    args = build_parser().parse_args(words[1:])
    assert _config_from(args).to_dict() == best["config"]
    report = (out / "report.md").read_text()
    chosen_row = next(line for line in report.splitlines() if "<- chosen" in line)
    assert chosen_row.startswith(f"| {result.labels[result.records.index(best)]} |")
    assert len(report.splitlines()) >= 4 + len(result.records) and "| fp32 | " in report
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(r["metrics"]["latency_ratio"] > 0 for r in result.records) and result.fp32["latency_ms"] > 0
    with pytest.raises(nq_onnx.NQError, match="no trial meets 'top1 >= fp32 \\+ 200'"):
        run_sweep(path, local=True, choice=Choice("top1 >= fp32 + 200", "mse"))


def test_pick_expressions():
    fp32 = {"top1": 80.0, "latency_ms": 10.0, "mse": 0.0}
    records = [{"metrics": {"top1": 79.9, "latency_ms": 6.0, "mse": 0.02}},
               {"metrics": {"top1": 79.5, "latency_ms": 5.0, "mse": 0.03}},
               {"metrics": {"top1": 80.1, "latency_ms": 7.0, "mse": 0.01}},
               {"metrics": {"top1": 79.7, "latency_ms": 6.0, "mse": 0.02}}]
    within = parse_pick("top1 >= fp32 - 0.3")
    assert choose(records, fp32, within, "latency_ms", maximize=False) is records[0]  # 79.5 is 0.5 below
    assert choose(records, fp32, (), "latency_ms", maximize=False) is records[1]
    fast = parse_pick("latency_ms <= 0.65 * fp32.latency_ms and (top1 - fp32) > -0.4")
    assert choose(records, fp32, fast, "top1", maximize=True) is records[0]  # 80.1 is too slow (7.0 > 6.5)
    assert choose(records, fp32, fast[:1] + parse_pick("mse > 0.02"), "top1", maximize=True) is records[1]
    assert choose(records, fp32, parse_pick("-mse >= -0.015"), "top1", maximize=True) is records[2]
    assert parse_pick("top1>=fp32-.3e1")[0].holds({"top1": 77.0}, fp32)
    assert not parse_pick("top1 >= fp32")[0].holds({}, fp32)  # a figure the trial lacks meets nothing
    for text, message in [("fp32 >= 1", "a bare fp32 needs exactly one metric"),
                          ("top1 >= fp32.speed", "unknown metric"),
                          ("top1", "ends too early"), ("top1 >= (fp32 - 1", "ends too early"),
                          ("top1 >= 1 1", "unexpected '1'"), ("__import__('os')", "cannot read")]:
        with pytest.raises(ConfigError, match=message):
            parse_pick(text)
    with pytest.raises(ConfigError, match="does not measure 'top1'"):
        parse_pick("top1 >= 1", available={"mse"})


def test_pareto_front_of_known_points():
    points = [(5.0, 79.5), (6.0, 79.9), (7.0, 80.1), (6.0, 79.7), (8.0, 80.0), (5.0, 79.0), (4.0, 70.0)]
    assert pareto_front(points) == [6, 0, 1, 2]  # (6, 79.7) by (6, 79.9); (8, 80.0) by (7, 80.1); (5, 79) by (5, 79.5)
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [0, 1]  # equal points do not dominate each other
    assert pareto_front([]) == []


def test_command_line_reproduces_the_config_or_falls_back_to_python():
    config = nq_onnx.QuantConfig(method="easyquant", w_bits=6, a_bits=6, seed=2, reparam=True, exclude=("head*",),
                                 quantize_attention_matmuls=False, bits_budget=None,
                                 search=nq_onnx.SearchConfig(search_images=4, sequential=False, objective="pearson"))
    command = command_line("m.onnx", "calib dir", "o.onnx", config)
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert _config_from(args) == config
    odd = nq_onnx.QuantConfig(search=nq_onnx.SearchConfig(noise_amplitudes=(0.0, 0.5)))
    code = command_line("m.onnx", "c", "o.onnx", odd)
    assert code.startswith("python -c ") and "QuantConfig.from_dict" in code
    recorded = json.loads(code[code.index("from_dict(") + len("from_dict("):code.rindex("}") + 1])
    assert nq_onnx.QuantConfig.from_dict(recorded) == odd
    accurate = nq_onnx.QuantConfig.preset("accurate", seed=1, w_bits=6, a_bits=6)
    words = shlex.split(command_line("m.onnx", "c", "o.onnx", accurate))
    assert words[words.index("--preset") + 1] == "accurate" and len(words) == 15, words  # + --seed, --w-bits, --a-bits
    assert _config_from(build_parser().parse_args(words[1:])) == accurate
    blas = {"internal_api": "openblas", "num_threads": 1,
            "env": {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_NUM_THREADS": "1"}}
    pinned = command_line("m.onnx", "c", "o.onnx", config, blas)
    assert pinned.startswith("OPENBLAS_CORETYPE=Haswell nq-onnx convert m.onnx ")  # threads: one in any case
    assert command_line("m.onnx", "c", "o.onnx", odd, blas).startswith("OPENBLAS_CORETYPE=Haswell python -c ")


def test_the_picked_command_carries_the_blas_kernels_the_trial_ran_under(tmp_path, inputs, monkeypatch):
    """The searches' float sums depend on numpy's BLAS kernels: the command ``--pick`` writes sets the trial's
    ``OPENBLAS_CORETYPE`` (and no thread count: conversions run their searches on one BLAS thread)."""
    monkeypatch.setenv("OPENBLAS_CORETYPE", os.environ.get("OPENBLAS_CORETYPE", "Haswell"))
    path = sweep_file(tmp_path, inputs, GRID.replace('["minmax", "easyquant"]', '"minmax"').replace("[8, 6]", "8"))
    assert main(["sweep", str(path), "--local", "-q", "--pick", "top1 >= 0", "--maximize", "top1"]) == 0
    trial = trial_lines(tmp_path / "s.sweep")[0]
    core = trial["worker"]["blas"]["env"]["OPENBLAS_CORETYPE"]
    command = (tmp_path / "s.sweep" / "picked.txt").read_text()
    assert command.startswith("OPENBLAS_") and f"OPENBLAS_CORETYPE={core} " in command, command
    assert "_NUM_THREADS" not in command and " nq-onnx convert " in command, command


def _same_results(a: list[dict], b: list[dict]) -> None:
    """The same trials, model bytes and figures (all but the wall times, which no two runs share)."""
    def comparable(records: list[dict]) -> list[tuple]:
        timing = ("convert_s", "latency_ms", "latency_ratio")
        return sorted((r["trial"], r["sha256"], {k: v for k, v in r["metrics"].items() if k not in timing})
                      for r in records)

    assert comparable(a) == comparable(b)


def test_ray_local_gives_the_serial_results(tmp_path, inputs):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'nq-onnx[sweep]')")
    serial = run_sweep(sweep_file(tmp_path, inputs, extra='out = "serial"'), local=True)
    lines: list[str] = []
    on_ray = run_sweep(sweep_file(tmp_path, inputs, extra='out = "ray"', name="r.toml"), num_cpus=1,
                       progress=lines.append)
    assert lines[0] == "sweep r.toml: 4 trials, 4 to run on 1 ray worker(s)"
    assert on_ray.run["executor"] == "ray" and on_ray.run["workers"] == 1
    _same_results(serial.records, on_ray.records)
    assert all(r["worker"]["pid"] != os.getpid() for r in on_ray.records)  # converted in Ray's workers
    assert all(r["worker"]["peak_rss_mb"] > 0 for r in on_ray.records)


@pytest.mark.slow
def test_two_ray_nodes_give_the_one_node_results(tmp_path, inputs):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'nq-onnx[sweep]')")
    from nq_onnx.sweep.local_cluster import local_cluster

    one = run_sweep(sweep_file(tmp_path, inputs, extra='out = "one"'), local=True)
    path = sweep_file(tmp_path, inputs, extra='out = "two"', name="t.toml")
    with local_cluster(nodes=2, cpus_per_node=1) as address:
        done = subprocess.run([sys.executable, "-m", "nq_onnx.cli", "sweep", str(path), "--address", address, "-q"],
                              env=os.environ | {"RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True,
                              timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    two = ResultsFile(tmp_path / "two" / "results.jsonl")
    assert two.runs[-1]["executor"] == "ray" and two.runs[-1]["workers"] == 2
    assert len({r["worker"]["node_id"] for r in two.trials.values()}) == 2  # two trials at once: one on each node
    _same_results(one.records, list(two.trials.values()))


@pytest.mark.parametrize("name, rows", [("methods", 27), ("mixed", 12), ("defaults", 12)])
def test_the_projects_studies_are_sweep_files(tmp_path, name, rows):
    """benchmarks/sweeps: every option valid, the rows the study has, three seeds each (data stood in by empty
    files: the real model and images are the benchmarks')."""
    import tomllib

    source = Path(__file__).resolve().parent.parent / "benchmarks" / "sweeps" / f"{name}.toml"
    folder = tmp_path / "benchmarks" / "sweeps"
    folder.mkdir(parents=True)
    data = tomllib.loads(source.read_text())
    for relative in (data["model"], data["calib"], data["eval"]["labelled"], data["eval"]["heldout"]):
        (folder / relative).resolve().parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).resolve().touch()
    spec = load_spec(shutil.copy(source, folder / source.name))
    trials = spec.trials()
    assert len(trials) == rows * 3 and all(t.config is not None for t in trials)
    assert len({repr(dataclasses.replace(t.config, seed=0)) for t in trials}) == rows
    assert all(t.config.w_bits == t.config.a_bits for t in trials)


def test_an_option_that_needs_another_is_checked_beside_its_table(tmp_path, inputs, capsys):
    """``split_softmax.split_softmax`` needs ``attention_probabilities``: with it in the same table the file loads,
    read through the API in a fresh interpreter (no conversion has registered the built-in techniques yet);
    without it the option is refused in one line that names it."""
    grid = "[grid]\nw_bits = 6\na_bits = 6\nsplit_softmax.split_softmax = true\n"
    path = sweep_file(tmp_path, inputs, grid + "attention_probabilities = true\n")
    code = ("import sys; from nq_onnx.sweep import load_spec; t = load_spec(sys.argv[1]).trials(); "
            "print(len(t), t[0].config.attention_probabilities, len(t[0].config.techniques))")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1", "True", "1"], done.stderr
    path = sweep_file(tmp_path, inputs, grid)
    assert main(["sweep", str(path), "--local"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "grid option 'split_softmax.split_softmax'" in err, err
    assert "add --attention-probabilities" in err and not (tmp_path / "s.sweep").exists()


def test_a_base_table_applies_to_every_grid_table_unless_it_sets_the_option(tmp_path):
    from nq_onnx.sweep.spec import load_spec

    (tmp_path / "m.onnx").write_bytes(b"")
    (tmp_path / "calib").mkdir()
    (tmp_path / "s.toml").write_text('model = "m.onnx"\ncalib = "calib"\n[eval]\nheldout = "calib"\n'
                                     '[base]\nreparam = false\nw_bits = 8\n'
                                     '[[grid]]\nmethod = "easyquant"\n'
                                     '[[grid]]\nmethod = "noisyquant"\nreparam = true\n')
    grid = load_spec(tmp_path / "s.toml").grid
    assert [dict(t) for t in grid] == [{"reparam": (False,), "w_bits": (8,), "method": ("easyquant",)},
                                       {"reparam": (True,), "w_bits": (8,), "method": ("noisyquant",)}]


def test_study_table_from_a_results_file_gives_each_configuration_its_seeds_mean_and_spread(tmp_path):
    """``benchmarks/table_sweep.py``: two configurations of two seeds each (and a failed trial, left out): the mean
    top-1, the spread (largest minus smallest) and the mean latency ratio are those of the records."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from table_sweep import seeds_markdown

    worker = {"cpu": {"model": "AMD EPYC", "kind": "x86 AVX-512 VNNI"}, "blas": {"architecture": "SkylakeX"},
              "versions": {"nq_onnx": "0.1.0"}, "peak_rss_mb": 900.0}
    lines = [{"kind": "sweep", "fp32": {"top1": 71.45, "mse": 0.0}}]  # top-1 in percent, as trials record it
    figures = {("easyquant", 0): (70.0, 0.05, 0.50), ("easyquant", 1): (71.0, 0.07, 0.52),
               ("noisyquant", 0): (71.2, 0.03, 0.48), ("noisyquant", 1): (71.6, 0.01, 0.50)}
    for (method, seed), (top1, mse, ratio) in figures.items():
        key = f"{method}-{seed}"
        lines.append({"kind": "trial", "trial": key, "status": "ok", "seed": seed, "worker": worker,
                      "options": {"method": method, "w_bits": 8, "a_bits": 8, "seed": seed},
                      "metrics": {"top1": top1, "mse": mse}})
        lines.append({"kind": "latency", "trial": key, "ratio_to_fp32": ratio})
    lines.append({"kind": "trial", "trial": "bad", "status": "failed", "seed": 0, "options": {"method": "x"},
                  "metrics": None})
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    table = seeds_markdown(path)
    rows = [line for line in table.splitlines() if line.startswith("| W8A8")]
    assert rows == ["| W8A8 noisyquant | 2 | 71.40 | 0.40 | 0.02 | 0.49x |",
                    "| W8A8 easyquant | 2 | 70.50 | 1.00 | 0.06 | 0.51x |"], table
    assert "(4 trials)" in table and "x86 AVX-512 VNNI" in table and "900 MB" in table


def test_study_table_by_flags_and_the_readme_line_of_the_default(tmp_path):
    """``table_sweep`` with ``flags``: configurations named by the ``convert`` flags that give them (the default by
    name), each seed's top-1 and the mean agreement; the README's line gives the default's mean, seeds and spread;
    an average-bits column appears where a trial ran under a bit budget."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from table_sweep import default_line, seeds_markdown

    lines = [{"kind": "sweep", "file": "defaults.toml", "fp32": {"top1": 71.45, "mse": 0.0},
              "identity": {"per_class": 200, "limit": None}}]
    figures = [({}, 0, 71.45, 0.02, 96.0, None), ({}, 1, 71.25, 0.04, 96.4, None),
               ({"bits_budget": 6.0}, 0, 69.0, 0.5, 88.0, 6.02)]
    for index, (options, seed, top1, mse, agreement, average) in enumerate(figures):
        lines.append({"kind": "trial", "trial": f"t{index}", "status": "ok", "seed": seed,
                      "options": {**options, "seed": seed}, "config": {"w_bits": None, "a_bits": 8},
                      "convert": {"average_bits": average},
                      "metrics": {"top1": top1, "mse": mse, "agreement": agreement}})
        lines.append({"kind": "latency", "trial": f"t{index}", "ratio_to_fp32": 0.5})
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    table = seeds_markdown(path, flags=True)
    assert "| configuration | seeds | average bits | seed 0 | seed 1 | top-1 % (mean) | spread |" in table
    assert ("| **default** (`nq-onnx convert` with no options) | 2 |  | 71.45 | 71.25 | 71.35 | 0.20 | 96.20 | 0.03 "
            "| 0.50x |") in table, table
    assert "| `--bits-budget 6.0` | 1 | 6.02 | 69.00 |  | 69.00 |  | 88.00 | 0.5 | 0.50x |" in table, table
    assert "the first 200 labelled images of every class" in table
    line = default_line(path, Path("results.jsonl"))
    assert "71.35 % mean top-1 against FP32's 71.45 %" in line and "by seed 71.45, 71.25, spread 0.20" in line
    assert "`benchmarks/sweeps/defaults.toml`" in line and "throughput 2.00x" in line


def test_seeds_that_cannot_vary_the_calibration_images_are_warned_about(tmp_path):
    """A seed chooses calib_size images from a folder holding more; from one holding no more (or from tensors) every
    seed calibrates on the same inputs, which the sweep says before it runs."""
    from nq_onnx.sweep.api import seed_warning
    from nq_onnx.sweep.spec import load_spec

    (tmp_path / "m.onnx").write_bytes(b"")
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(4):
        (calib / f"{i}.png").write_bytes(b"")

    def spec(seeds: str, size: int, source: str = "calib"):
        (tmp_path / "s.toml").write_text(f'model = "m.onnx"\ncalib = "{source}"\nseeds = {seeds}\n[eval]\n'
                                         f'heldout = "calib"\n[grid]\nmethod = "easyquant"\ncalib_size = {size}\n')
        return load_spec(tmp_path / "s.toml")

    warning = seed_warning(spec("[0, 1, 2]", 4))
    assert warning and "calib holds 4 images and the trials calibrate on 4" in warning
    assert seed_warning(spec("[0, 1, 2]", 3)) is None  # 3 of 4: each seed its own choice
    assert seed_warning(spec("[0]", 4)) is None  # one seed: nothing to vary
    np.save(tmp_path / "x.npy", np.zeros((8, 3), np.float32))
    assert "first calib_size rows of x.npy" in seed_warning(spec("[0, 1]", 2, "x.npy"))


@pytest.mark.parametrize("nodes, cpus", [(0, 1), (2, 0)])
def test_a_local_cluster_of_no_node_or_no_cpu_is_refused_before_starting(nodes, cpus):
    from nq_onnx.sweep.local_cluster import local_cluster

    with pytest.raises(ConfigError, match=rf"^a local Ray cluster needs at least 1 node of at least 1 CPU, got "
                                          rf"{nodes} of {cpus}$"):
        with local_cluster(nodes=nodes, cpus_per_node=cpus):
            pass


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resetting the peak needs Linux's clear_refs")
def test_a_trials_peak_memory_is_its_own_not_the_workers_earlier_tasks():
    """A worker that ran a larger task before records the trial's own high-water mark: 200 MB touched and freed
    before the reset do not count."""
    from nq_onnx.sweep.tasks import peak_rss_mb, reset_peak_rss

    big = np.ones(200_000_000 // 8)
    big[:] = 2.0
    before = peak_rss_mb()
    del big
    reset_peak_rss()
    small = np.ones(20_000_000 // 8)
    small[:] = 1.0
    after = peak_rss_mb()
    assert before - after > 150, (before, after)
