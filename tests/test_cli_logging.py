"""What the command line shows while it works: stage lines, progress lines off a terminal (the mixed-precision
sensitivity pass included), -q, --log-file; and the library printing nothing."""

from __future__ import annotations

import logging

import nq_onnx
from nq_onnx.cli import log as cli_log
from nq_onnx.cli import main
from nq_onnx.core.timing import timed

STAGES = ("calibrate", "reparam", "search", "check", "evaluate", "save")


def _convert(work, *extra) -> int:
    tmp, model, calib = work
    return main(["convert", str(model), "-o", str(tmp / "out.onnx"), "--calib", str(calib), "--search-images", "2",
                 "--holdout-images", "1", *extra])


def test_progress_line():
    assert cli_log.progress_line("search", 12, 48, 40.0) == "search: 12/48, 40 s, ~2 min left"
    assert cli_log.progress_line("calibrate", 3, None, 200.0) == "calibrate: 3, 3 min"
    assert cli_log.progress_line("x", 1, 2, 2 * 3600.0) == "x: 1/2, 2.0 h, ~2.0 h left"


def test_log_progress_every_interval(caplog, monkeypatch):
    monkeypatch.setattr(cli_log, "INTERVAL", 30.0)
    ticks = iter([0.0, 10.0, 31.0, 40.0, 70.0])  # the start, then after each of the four items
    with caplog.at_level(logging.INFO, logger=cli_log.PROGRESS):
        items = list(cli_log.log_progress(["a", "b", "c", "d"], 4, "search", clock=lambda: next(ticks)))
    assert items == ["a", "b", "c", "d"]
    assert [r.getMessage() for r in caplog.records] == ["search: 2/4, 31 s, ~31 s left",
                                                        "search: 4/4, 70 s, ~0 s left"]


def test_timed_logs_stages_at_info_and_their_parts_at_debug(caplog):
    seconds: dict[str, float] = {}
    with caplog.at_level(logging.DEBUG, logger="nq_onnx"):
        with timed(seconds, "search_s"):
            with timed(seconds, "linear_search_s"):
                pass
    got = [(r.levelno, r.getMessage().split(":")[0]) for r in caplog.records]
    assert got == [(logging.INFO, "search ..."), (logging.DEBUG, "linear search ..."), (logging.DEBUG, "linear search"),
                   (logging.INFO, "search")]
    assert set(seconds) == {"search_s", "linear_search_s"} and seconds["search_s"] >= seconds["linear_search_s"]


def test_verbose_shows_each_stage_with_its_seconds(work, capsys):
    assert _convert(work, "-v") == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    for stage in STAGES:
        assert f"{stage} ..." in err
        assert any(line.startswith(f"{stage}: ") and line.endswith(" s") for line in err), stage
    assert "linear search ..." not in err  # a part of the search: -vv
    assert captured.out.startswith("nq-onnx noisyquant: 2 layers quantized")


def test_default_shows_warnings_and_no_stage(work, capsys):
    assert _convert(work, "--method", "easyquant", "--noise", "paper") == 0
    captured = capsys.readouterr()
    assert captured.err == "warning: --noise ignored: method easyquant adds no noise\n"
    assert captured.out.startswith("nq-onnx easyquant: ")


def test_quiet_prints_errors_and_the_summary_alone(work, capsys, monkeypatch):
    monkeypatch.setattr(cli_log, "INTERVAL", 0.0)
    assert _convert(work, "-q", "--method", "easyquant", "--noise", "paper") == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.startswith("nq-onnx easyquant: ") and "  time: " in captured.out


def test_off_a_terminal_progress_lines_cover_the_sensitivity_pass(work, capsys, monkeypatch):
    monkeypatch.setattr(cli_log, "INTERVAL", 0.0)  # a line after every item
    assert _convert(work, "--bits-budget", "6", "--mixed-images", "2") == 0
    err = capsys.readouterr().err.splitlines()
    assert "mixed precision: sensitivities: 1/2, 0 s, ~0 s left" in err
    assert "mixed precision: sensitivities: 2/2, 0 s, ~0 s left" in err
    assert any(line.startswith("search (noisyquant): 2/2, ") for line in err)
    assert any(line.startswith("calibrate: 1/1, ") for line in err)


def test_searched_sensitivity_shows_each_widths_search(work, capsys, monkeypatch):
    monkeypatch.setattr(cli_log, "INTERVAL", 0.0)
    assert _convert(work, "--bits-budget", "6", "--mixed-sensitivity", "searched", "--activations", "symmetric",
                    "--mixed-images", "2") == 0
    err = capsys.readouterr().err
    for bits in (4, 5, 6, 8):
        assert f"mixed precision: sensitivities: search at {bits} bits: 2/2, " in err


def test_log_file_holds_every_stage_and_the_summary(work, capsys):
    tmp = work[0]
    log = tmp / "run.log"
    assert _convert(work, "-q", "--log-file", str(log)) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    text = log.read_text()
    assert " INFO nq_onnx.cli: nq-onnx " in text and "--log-file" in text
    for stage in STAGES:
        assert f" INFO nq_onnx.stages: {stage}: " in text
    assert captured.out.splitlines()[0] in text
    handlers = logging.getLogger("nq_onnx").handlers  # the CLI's handlers are gone after it returns
    assert all(isinstance(h, logging.NullHandler) for h in handlers)


def test_an_error_goes_to_the_log_file_too(work, capsys):
    tmp, model, calib = work
    log = tmp / "run.log"
    code = main(["convert", str(tmp / "nope.onnx"), "-o", str(tmp / "o.onnx"), "--calib", str(calib), "--log-file",
                 str(log)])
    assert code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert " ERROR nq_onnx.cli: " in log.read_text() and "nope.onnx" in log.read_text()


def test_the_library_never_prints(work, capsys):
    tmp, model, calib = work
    config = nq_onnx.QuantConfig(bits_budget=6.0, search=nq_onnx.SearchConfig(search_images=2, holdout_images=1))
    nq_onnx.convert(model, tmp / "api.onnx", calib, config)
    assert capsys.readouterr() == ("", "")
