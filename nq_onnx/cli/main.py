"""``nq-onnx``: export, convert, inspect, report, demo, sweep. User errors become one line on stderr and exit status 2.

``convert``'s configuration flags are generated from the fields' declarations (:mod:`nq_onnx.cli.options`); its
other options (paths, preprocessing, what to write) are declared here.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import shlex
import sys
import textwrap
import time
import warnings
from typing import Callable

from nq_onnx.cli import commands as cli_commands
from nq_onnx.core.version import __version__
from nq_onnx.cli.commands import EXTERNAL_DATA, add_run_options
from nq_onnx.cli.log import check_log_file, configured, progress
from nq_onnx.cli.options import Resolved, add_config_options, argument_groups, ignored, preset_help, resolve
from nq_onnx.core import technique
from nq_onnx.core.config import QuantConfig
from nq_onnx.cli.config_file import FORMATS, dump, plain, to_mapping
from nq_onnx.core.errors import ConfigError, NQError
from nq_onnx.core.options import default_of, root_section
from nq_onnx.core.presets import PRESETS
from nq_onnx.report.summary import format_summary

log = logging.getLogger("nq_onnx.cli")

EXIT_CODES = (
    (0, "success; --print-config: the configuration was printed"),
    (1, "inspect --strict or --target: a quantized layer runs in float, can saturate, or the model does not suit "
        "the target"),
    (2, "the input is wrong: one line starting with 'nq-onnx: error:' says what to change; nothing was written and "
        "the input model is untouched"),
    (70, "internal error: a bug in nq-onnx; the traceback is printed"),
    (130, "interrupted (Ctrl-C); outputs are written atomically, so none is left half-written"),
)

def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


# convert's options that are not configuration fields: (group, flags, argparse keywords)
CONVERT_OPTIONS = (
    ("output", ("-o", "--output"), {"help": "output ONNX model"}),
    ("data", ("--calib",), {"metavar": "DATA", "help": "folder of images (recursive) or .npy/.npz of ready input "
                                                        "tensors"}),
    ("data", ("--input-size",), {"metavar": "C,H,W", "type": _ints,
                                 "help": "image size if the model does not record it"}),
    ("data", ("--mean",), {"type": _floats, "help": "normalization mean (default: model metadata or ImageNet)"}),
    ("data", ("--std",), {"type": _floats, "help": "normalization std (default: model metadata or ImageNet)"}),
    ("data", ("--interpolation",), {"choices": ["bicubic", "bilinear", "nearest", "lanczos"],
                                    "help": "resize filter"}),
    ("data", ("--crop-pct",), {"type": float, "help": "centre-crop fraction (1.0: resize shorter side, crop square)"}),
    ("data", ("--eval",), {"metavar": "DATA", "help": "images or .npy/.npz the searches never see, to evaluate the "
                                                       "model on for the summary and the report"}),
    ("data", ("--eval-labels",), {"metavar": "FILE", "help": "labels of the --eval images, for top-1"}),
    ("output", ("--save-plan",), {"metavar": "PLAN.json", "help": "write the plan (JSON + .npz beside it)"}),
    ("output", ("--load-plan",), {"metavar": "PLAN.json", "help": "skip calibration and use a saved plan"}),
    ("output", ("--no-eval",), {"action": "store_true", "help": "skip the output-error check against the float "
                                                                 "model"}),
    ("output", ("--latency",), {"action": "store_true", "help": "measure batch latency against FP32's for the "
                                                                 "summary and the report"}),
    ("output", ("--report",), {"metavar": "REPORT.html", "help": "write a self-contained HTML report of the "
                                                                  "conversion"}),
    ("output", ("--report-dir",), {"metavar": "DIR", "help": "also write the report's figures (PNG) and numbers "
                                                              "(JSON) here"}),
    ("output", ("--profile",), {"metavar": "PROFILE.json", "help": "write where the conversion's seconds went "
                                "(stages, the search's parts and phases, the CPU and numpy's BLAS kernels) as JSON"}),
    ("output", ("--external-data",), {"choices": ["auto", "yes", "no"], "default": "auto",
                                      "help": "write large tensors to a data file beside the model (auto: when the "
                                              "input had external data or the output is over 2 GiB)"}),
    ("output", ("-f", "--force"), {"action": "store_true", "help": "replace existing output files"}),
    ("run", ("--preset",), {"choices": list(PRESETS), "help": preset_help()}),
    ("run", ("--config",), {"metavar": "FILE", "help": "read settings from a TOML or JSON file (by extension): "
                            "configuration fields at the top, a [search] table; flags override it, it overrides "
                            "--preset"}),
    ("run", ("--print-config",), {"nargs": "?", "const": "toml", "choices": FORMATS, "metavar": "FORMAT",
                                  "help": "print the resolved configuration (defaults < --preset < --config < flags) "
                                          "as TOML (or json) and exit without converting; --config reads it back"}),
)
# run options convert passes to nq_onnx.convert where given: (argparse dest, keyword, flag)
RUN_KEYWORDS = (("eval", "eval_data", "--eval"), ("eval_labels", "eval_labels", "--eval-labels"),
                ("latency", "measure_latency", "--latency"))


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="quantize an ONNX model with NoisyQuant (or MinMax / EasyQuant)",
        description="Calibrate on DATA, search scales and noise, write a QDQ ONNX model.",
    )
    p.add_argument("model", nargs="?", help="input ONNX model (never modified)")
    groups = argument_groups(p)
    for group, flags, keywords in CONVERT_OPTIONS:
        groups[group].add_argument(*flags, **keywords)
    add_config_options(p, groups)
    add_run_options(p, groups["run"], quiet="errors and the final summary alone")
    p.set_defaults(func=_convert, prepare=_prepare_convert)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``nq-onnx: error: ...``), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"nq-onnx: error: {message} (see {self.prog} --help)\n")


def _epilog(width: int = 100) -> str:
    lines = ["exit status:"]
    for code, meaning in EXIT_CODES:
        lines += textwrap.wrap(meaning, width, initial_indent=f"  {code:<5}", subsequent_indent=" " * 7)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    technique.load_builtin()  # the built-in techniques' own settings declare flags too
    parser = _Parser(prog="nq-onnx", description="NoisyQuant post-training quantization for ONNX ViTs.",
                     epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nq-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    cli_commands.add_export(sub)
    _add_convert(sub)
    cli_commands.add_inspect(sub)
    cli_commands.add_report(sub)
    cli_commands.add_demo(sub)
    cli_commands.add_sweep(sub)
    return parser


def _config_from(args) -> QuantConfig:
    """The QuantConfig of parsed ``convert`` arguments (defaults < ``--preset`` < ``--config`` < flags)."""
    return resolve(args).config


def _prepare_convert(args, argv: list[str]) -> tuple[Resolved, list[str]]:
    """Everything ``convert`` can refuse before any work: the configuration and the options' combinations."""
    resolved = resolve(args)
    if not args.print_config:
        if args.model is None or args.output is None:
            raise ConfigError("convert needs MODEL and -o OUTPUT (or --print-config)")
        if args.eval_labels is not None and args.eval is None:
            raise ConfigError("--eval-labels needs --eval DATA (the images they label)")
    return resolved, argv


def config_text(resolved: Resolved, kind: str) -> str:
    """The resolved configuration as a file ``--config`` reads back to the same configuration. A field whose
    default is ``None`` (the target's, as ``w_bits``) and that nothing set stays unset, so that ``--target`` still
    chooses it; TOML shows its value as a comment."""
    root = root_section()
    derived = {f.name: getattr(resolved.config, f.name) for f in dataclasses.fields(root.cls)
               if default_of(f) is None and resolved.source(root.name, f.name) is None}
    mapping = to_mapping(resolved.configs, {(root.name, name) for name in derived})
    comments = {name: f"{json.dumps(plain(value))} (the target's; set it to fix it)"
                for name, value in derived.items() if value is not None}
    return dump(mapping, kind, comments)


def _convert(args, resolved: Resolved, argv: list[str]) -> int:
    if args.print_config:
        print(config_text(resolved, args.print_config), end="")
        return 0
    from nq_onnx.pipeline import convert

    for line in ignored(resolved, args.load_plan is not None):
        log.warning(line)
    preprocess = {k: getattr(args, k) for k in ("input_size", "mean", "std", "interpolation", "crop_pct")}
    extra = _run_keywords(convert, args, argv)
    start = time.perf_counter()
    result = convert(args.model, args.output, args.calib, resolved.config, load_plan=args.load_plan,
                     save_plan=args.save_plan, force=args.force, evaluate=not args.no_eval, preprocess=preprocess,
                     progress=progress(args.quiet), report=args.report, report_dir=args.report_dir,
                     external_data=EXTERNAL_DATA[args.external_data], profile=args.profile, **extra)
    summary = format_summary(result.summary, time.perf_counter() - start, args.output)
    print(summary)
    log.info(summary, extra={"console": False})
    return 0


def _run_keywords(convert, args, argv: list[str]) -> dict:
    """The evaluation options given, and the command line, as ``convert`` keywords where it takes them."""
    accepted = inspect.signature(convert).parameters
    out = {}
    for dest, keyword, flag in RUN_KEYWORDS:
        value = getattr(args, dest)
        if value is None or value is False:
            continue
        if keyword not in accepted:
            raise ConfigError(f"{flag} is not available in this version of nq-onnx's conversion")
        out[keyword] = value
    if "command" in accepted:
        out["command"] = shlex.join(["nq-onnx", *argv])
    return out


def _guarded(call: Callable[[], int]) -> int:
    """``call()``; an NQError becomes one line and status 2, a bug keeps its traceback (status 70)."""
    try:
        with warnings.catch_warnings():  # dependencies' deprecation notices are not the user's business
            warnings.simplefilter("ignore", DeprecationWarning)
            return call()
    except NQError as exc:
        print(f"nq-onnx: error: {exc}", file=sys.stderr)
        log.error("%s", exc, extra={"console": False})
        return 2
    except KeyboardInterrupt:
        print("nq-onnx: interrupted; no output was written", file=sys.stderr)
        log.error("interrupted", extra={"console": False})
        return 130
    except Exception:
        import traceback

        traceback.print_exc()
        log.error("internal error", exc_info=True, extra={"console": False})
        print(
            "nq-onnx: internal error (a bug in nq-onnx, not your input); the README's section \"Reporting a "
            "problem\" says what to send with the traceback above",
            file=sys.stderr,
        )
        return 70


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (status 2) and --help/--version (status 0)
        return int(exc.code or 0)
    prepared: list = []

    def prepare() -> int:  # what a subcommand can refuse, refused before logging opens --log-file
        check_log_file(args.log_file)
        prepared.extend(args.prepare(args, argv) if getattr(args, "prepare", None) else ())
        return 0

    code = _guarded(prepare)
    if code:
        return code
    with configured(args.verbose, args.quiet, args.log_file):
        log.info("nq-onnx %s: %s", __version__, shlex.join(argv))
        return _guarded(lambda: args.func(args, *prepared))
