"""Typed, validated configuration for a conversion.

Everything a conversion depends on is a field here, so a config plus a model plus data plus a seed
determine the output bytes. Invalid values raise :class:`~nq_onnx.core.errors.ConfigError` at construction.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from nq_onnx.core import quant
from nq_onnx.core.errors import ConfigError
from nq_onnx.core.options import Condition, option, register_section
from nq_onnx.core.presets import preset_values
from nq_onnx.core.technique import settings_from_dict, settings_on, settings_to_dict, technique_of

SUPPORTED_BITS = (4, 5, 6, 7, 8)  # 7: int8 codes that no x86 kernel saturates (onnxruntime's reduce_range)


class Method(str, enum.Enum):
    """How activation and weight scales (and noise) are chosen."""

    MINMAX = "minmax"
    EASYQUANT = "easyquant"
    NOISYQUANT = "noisyquant"
    PTQ4VIT = "ptq4vit"  # EasyQuant's search with PTQ4ViT's twin-uniform quantizers after Softmax and GELU
    NOISYQUANT_PTQ4VIT = "noisyquant-ptq4vit"  # the paper's NoisyQuant-PTQ4ViT: the noisy bias on top of that

    @property
    def noisy(self) -> bool:
        """Whether the method searches NoisyQuant's noise."""
        return self in (Method.NOISYQUANT, Method.NOISYQUANT_PTQ4VIT)

    @property
    def twin(self) -> bool:
        """Whether post-Softmax and post-GELU inputs take PTQ4ViT's twin-uniform quantizer."""
        return self in (Method.PTQ4VIT, Method.NOISYQUANT_PTQ4VIT)


class NoiseMode(str, enum.Enum):
    """What NoisyQuant's fixed vector ``N`` before a linear layer may hold (see :mod:`nq_onnx.search.groups`).

    ``paper``: the paper's noisy bias alone, uniform noise ``k s u`` with its width ``k`` searched. ``shift``: a
    per-channel mean shift ``-b c`` alone (``c`` the channel's calibrated mid-range; the authors' code searches it
    too), in effect a per-channel zero point folded into the bias. ``paper+shift``: both (the default).
    """

    PAPER = "paper"
    SHIFT = "shift"
    BOTH = "paper+shift"


class WeightRounding(str, enum.Enum):
    """How weights are rounded to their codes: to the nearest code, GPTQ's error-compensating order on the float
    input, or GPTQ fitted to the float output from the layer's quantized input (``gptq-act``,
    :mod:`nq_onnx.search.rounding`)."""

    NEAREST = "nearest"
    GPTQ = "gptq"
    GPTQ_ACT = "gptq-act"


class Objective(str, enum.Enum):
    """What the EasyQuant-style scale searches maximize on a layer's output ``Y`` against the float ``T``.

    ``cosine`` (EasyQuant, the default): ``<Y, T> / (||Y|| ||T||)``. ``pearson`` (PTQ-ViT's similarity-aware
    search): the cosine of the mean-centred outputs, blind to an offset as well as to a scale.
    """

    COSINE = "cosine"
    PEARSON = "pearson"


class MixedSensitivity(str, enum.Enum):
    """How mixed precision (``bits_budget``) measures a group's sensitivity to its bit-width
    (:mod:`nq_onnx.search.mixed`).

    ``output`` (default): the model output's MSE with that group alone MinMax-quantized, one forward pass per group
    and width. ``joint``: the change of that MSE when the group's width moves with every other group quantized at
    the budget's uniform width (the operating point the assignment departs from), as many passes; on the real
    ViT-S/14 at a 6.0-bit budget it did worse (44.8 % top-1 against 60.0 %, ``benchmarks/results/mixed.json``).
    ``nuclear``: PTQ-ViT's per-module ``||Y||_* ||Y(b) - Y||^2`` of the outputs the group feeds (cheaper, but on
    the real ViT-S/14 at a 6.0-bit budget it sent every proj and fc2 to 4 bits: 21 % top-1).
    ``searched``: as ``joint``, but each group at each width takes what the method's own uniform search at that
    width chose for it (step, noise, rounded weights), not MinMax: one full search per width (4, 5, 6 and 8
    bits) before the mixed one, so about five times the search's time. Uniform activation quantizers only. On the
    real ViT-S/14 at 6.0 bits it did worse too (45.2 % top-1 on 1 image's sensitivities, 49.0 % on 8, against
    uniform's 59.0 %): around the 6-bit model one group's width moves the output error by noise-sized amounts
    (``benchmarks/results/mixed_additivity.json``).
    """

    OUTPUT = "output"
    JOINT = "joint"
    NUCLEAR = "nuclear"
    SEARCHED = "searched"


class WeightDtype(str, enum.Enum):
    """How weight codes are stored, which decides onnxruntime's CPU kernel (see :mod:`nq_onnx.io.cpu`).

    ``int8-paired`` (the portable and x86-avx2 targets' default): int8 everywhere (the fast U8S8 kernels), 8-bit
    codes kept to ``|q_2i| + |q_2i+1| <= 128`` on the pairs of rows the kernel adds into one int16
    (:func:`nq_onnx.core.quant.limit_pairs`): exact on every CPU at nearly 8 bits' resolution. ``auto``: int8 where
    no two codes of a column can overflow a 16-bit pair sum whatever the kernel pairs
    (:func:`nq_onnx.core.quant.u8s8_safe`), uint8 with zero point 128 elsewhere (the slower U8U8 kernels): exact
    on every CPU with unconstrained codes. ``uint8``: every layer uint8. ``int8``: every layer int8 with
    unconstrained codes, for deployments on VNNI/AMX x86 or ARM64 only: on x86 without VNNI full-range codes
    saturate, and ``nq-onnx inspect --strict`` fails on such a model.
    """

    AUTO = "auto"
    UINT8 = "uint8"
    INT8 = "int8"
    INT8_PAIRED = "int8-paired"


class Activations(str, enum.Enum):
    """How activation groups are quantized per tensor (:class:`~nq_onnx.core.quantizers.ActQuantizer`).

    ``symmetric``: scale-only codes around zero (unsigned from zero where calibration saw no negative value).
    ``asymmetric``: as ``symmetric``, except that a positively skewed group (calibrated minimum below zero but at
    most ``SKEW`` of its maximum in magnitude: a GELU output, ``>= -0.17``) takes uint8 codes anchored at its
    minimum, with its zero point following the searched step: on such a tensor a symmetric range wastes nearly
    half of its codes on negative values it never takes.
    """

    SYMMETRIC = "symmetric"
    ASYMMETRIC = "asymmetric"


SKEW = 0.25  # an asymmetric group's |minimum| / maximum at most this (symmetric codes would waste 40 % or more)


# when an option does something (a flag given where its condition fails is warned about, not refused)
SEARCHED = Condition(lambda c: c.method != Method.MINMAX, lambda c: "method minmax searches nothing")
NOISY = Condition(lambda c: c.method.noisy, lambda c: f"method {c.method.value} adds no noise")
BUDGETED = Condition(lambda c: c.bits_budget is not None, lambda c: "it applies under --bits-budget only")
ATTENTION = Condition(lambda c: c.quantize_attention_matmuls,
                      lambda c: "--no-attention-matmuls keeps the attention matmuls in float")


class Target(str, enum.Enum):
    """Where the model will run, which decides weight storage, activation types and Q/DQ placement.

    ``portable`` (default): exact on every CPU: int8 weights whose 8-bit codes keep every pair that onnxruntime's
    U8S8 kernel adds into one int16 within ``|q_2i| + |q_2i+1| <= 128``, which no uint8 activation can saturate on
    an x86 CPU without VNNI (``weight_dtype int8-paired``). ``x86-avx2``: the same rule (it is that CPU's).
    ``x86-vnni`` and ``arm64``: int8 weights everywhere, the fast kernels of CPUs whose integer sums are 32-bit
    (VNNI/AMX x86, ARM64 dot products). ``gpu``: what TensorRT's Q/DQ fusion expects: int8 weights, symmetric int8
    activations with zero point 0, Q/DQ on both inputs of every quantized matmul and none elsewhere; no twin-uniform
    quantizer (a float select and uint8 codes), no asymmetric activations, no int16 biases.
    """

    PORTABLE = "portable"
    X86_AVX2 = "x86-avx2"
    X86_VNNI = "x86-vnni"
    ARM64 = "arm64"
    GPU = "gpu"

    @property
    def weight_dtype(self) -> "WeightDtype":
        """The weight storage this target runs fastest while staying exact on it."""
        return WeightDtype.INT8_PAIRED if self.exact_everywhere else WeightDtype.INT8

    @property
    def exact_everywhere(self) -> bool:
        return self in (Target.PORTABLE, Target.X86_AVX2)

    @property
    def w_bits(self) -> int:
        """The default weight width: 8 on every target (where the model must be exact on every CPU, with the
        kernel pairs' limit of ``int8-paired`` storage)."""
        return 8


def _coerce_enum(config, name: str, kind: type[enum.Enum], label: str) -> None:
    """Turn the string in a frozen config's field ``name`` into its enum member, or raise a one-line ConfigError."""
    try:
        object.__setattr__(config, name, kind(getattr(config, name)))
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise ConfigError(f"unknown {label} {getattr(config, name)!r}; choose one of {choices}") from None


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Grids and sample sizes of the EasyQuant scale search and the NoisyQuant noise search.

    ``act_alphas``/``weight_alphas`` are the (low, high, count) grids of the multiplier applied to the
    MinMax scale; ``noise_amplitudes`` is the grid of the uniform-noise width in units of the activation
    quantization step; ``noise_shifts`` the grid of the fraction of the per-channel centre that is
    subtracted (a shift of 1 centres every channel on zero), tried only where calibration saw at least
    ``shift_min_rows`` rows of the group's input: a per-channel range estimated from fewer (a pooled head sees
    one row per image) is too loose to centre on, and held-out rows beyond it are clipped.

    The searches fit on ``tokens`` rows of the first ``search_images`` calibration images; the noise they choose
    is kept only where it also beats the noiseless (EasyQuant) solution on rows of the next ``holdout_images``
    images, which no search saw (``0``: no such check), and so is a technique's quantizer against the uniform one
    it replaces, and GPTQ and bias correction against nearest rounding (these two on the fit rows where there are
    no held-out images).
    On the real ViT-S/14, 32 fit and 16 held-out images lowered the W6A6 output error on each of three seeds against
    the defaults of 8 and 4, and moved the W8A8 one either way by seed (``benchmarks/sweeps/defaults.toml``).

    Candidate activation steps of EasyQuant's alternating search are screened: with ``screen_tokens > 0`` every
    candidate is scored on that many of the fit rows (a stratified sample, :func:`nq_onnx.search.grids.screen_rows`)
    and only the ``screen_keep`` best of them on all rows (:func:`nq_onnx.search.grids.grid_argmax`). On the real
    ViT-S/14 the full search's best step was the screen's first or second in all 192 searches (W8A8 and W6A6);
    ``screen_tokens = 0`` scores every candidate on every row (``benchmarks/compile_cost.py`` measures both). The noise
    search and the attention-matmul search choose exactly what scoring every candidate in full would.

    The output of a ViT classifier reads one token (the class token; :func:`nq_onnx.passes.find_layers.read_tokens`
    finds it in the graph), yet a search over all tokens weighs it as one row in hundreds and will clip values only
    it carries. ``read_token_share`` gives the rows of the read tokens that share of each linear group's fit and
    held-out samples (repeated; the rest drawn from the other tokens, :func:`nq_onnx.search.groups.search_sample`; 0:
    every row counts once). On the real ViT-S/14 a share of 0.5 roughly halved NoisyQuant W8A8's held-out output
    MSE and cut W6A6's by a quarter (``benchmarks/compile_cost.py``, the ``*_uniform_rows`` rows against the
    default ones); a model that pools every token (Swin) has no read token and is unaffected.

    With ``grid_stride > 1`` every grid is searched coarse to fine (:func:`nq_onnx.search.grids.grid_argmax`): every
    ``grid_stride``-th point, then the points around the best of them. The default 1 scores every point: on the
    real ViT-S/14 a stride of 3 converted 1.3x faster but raised the held-out output MSE by 3 % (W8A8) and 6 %
    (W6A6) (``benchmarks/compile_cost.py``, its ``*_grid3`` rows).
    """

    act_alphas: tuple[float, float, int] = (0.3, 1.0, 36)
    weight_alphas: tuple[float, float, int] = (0.5, 1.0, 26)
    rounds: int = 2
    noise_amplitudes: tuple[float, ...] = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
    noise_shifts: tuple[float, ...] = (0.0, 0.5, 1.0)
    shift_min_rows: int = 1024
    tokens: int = dataclasses.field(default=1024, metadata=option(
        "token rows per layer search", "search", flag="--search-tokens", applies=SEARCHED))
    read_token_share: float = dataclasses.field(default=0.5, metadata=option(
        "share of each layer search's rows given to the tokens the model's output reads (a ViT's class token; 0: "
        "every row counts once)", "search", applies=SEARCHED))
    screen_tokens: int = dataclasses.field(default=256, metadata=option(
        "score every candidate step on this many of the token rows first, then only the best few (--screen-keep) on "
        "all of them (0: score every candidate on all rows)", "search", applies=SEARCHED))
    screen_keep: int = dataclasses.field(default=3, metadata=option(
        "candidates per search scored on all rows after screening", "search", applies=SEARCHED))
    search_images: int = dataclasses.field(default=8, metadata=option(
        "images the per-layer searches run on", "search", applies=SEARCHED))
    holdout_images: int = dataclasses.field(default=4, metadata=option(
        "further images on which each searched choice (a noise, a quantizer in place of the uniform one, GPTQ, bias "
        "correction) must beat the plain one to be kept (0: GPTQ and bias correction on the fit images, the rest "
        "unchecked)", "search",
        applies=SEARCHED))
    sequential: bool = dataclasses.field(default=True, metadata=option(
        "search each layer after the quantized earlier layers (--no-sequential: every layer on float activations)",
        "search", applies=SEARCHED))
    grid_stride: int = dataclasses.field(default=1, metadata=option(
        "search grids coarse to fine: every Nth point, then the best one's neighbours (1: every point; 3 is faster "
        "and slightly less accurate)", "search", applies=SEARCHED))
    objective: Objective = dataclasses.field(default=Objective.COSINE, metadata=option(
        "what the scale searches maximize on each layer's output: cosine (EasyQuant) or pearson (PTQ-ViT's "
        "similarity-aware search)", "search", applies=SEARCHED))
    # gamma of PTQ-ViT's ranking loss on attention scores (Q K^T); 0: off
    ranking_loss: float = dataclasses.field(default=0.0, metadata=option(
        "PTQ-ViT's ranking loss on attention scores (Q K^T), weighted by GAMMA (the paper: 0.1; 0: off; margin 0.2)",
        "search", metavar="GAMMA", applies=SEARCHED))
    ranking_margin: float = 0.2  # theta of that loss, in the units of the scores
    ranking_pairs: int = 16  # sampled score pairs per query row

    def __post_init__(self) -> None:
        _coerce_enum(self, "objective", Objective, "objective")
        if self.ranking_loss < 0 or self.ranking_margin < 0 or self.ranking_pairs < 1:
            raise ConfigError("search.ranking_loss and ranking_margin must be non-negative, ranking_pairs at least 1")
        for name in ("act_alphas", "weight_alphas"):
            low, high, count = getattr(self, name)
            if not (0 < low <= high) or int(count) < 1:
                raise ConfigError(f"search.{name} must be (low, high, count) with 0 < low <= high, count >= 1")
        if self.rounds < 1:
            raise ConfigError("search.rounds must be at least 1")
        if not self.noise_amplitudes or min(self.noise_amplitudes) < 0:
            raise ConfigError("search.noise_amplitudes must be non-empty and non-negative")
        if not self.noise_shifts or min(self.noise_shifts) < 0 or max(self.noise_shifts) > 1:
            raise ConfigError("search.noise_shifts must be non-empty fractions in [0, 1]")
        if self.shift_min_rows < 0:
            raise ConfigError("search.shift_min_rows must be non-negative")
        if not 0 <= self.read_token_share < 1:
            raise ConfigError("search.read_token_share must be a fraction in [0, 1)")
        if self.tokens < 16:
            raise ConfigError("search.tokens must be at least 16")
        if self.screen_tokens < 0 or self.screen_keep < 1:
            raise ConfigError("search.screen_tokens must be non-negative and search.screen_keep at least 1")
        if self.search_images < 1:
            raise ConfigError("search.search_images must be at least 1")
        if self.grid_stride < 1:
            raise ConfigError("search.grid_stride must be at least 1")
        if self.holdout_images < 0:
            raise ConfigError("search.holdout_images must be non-negative")

    def noise_grid(self, mode: "NoiseMode") -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(shifts, amplitudes)`` a noise mode searches; each includes 0."""
        mode = NoiseMode(mode)
        shifts = tuple(sorted({0.0, *self.noise_shifts})) if mode != NoiseMode.PAPER else (0.0,)
        amplitudes = tuple(sorted({0.0, *self.noise_amplitudes})) if mode != NoiseMode.SHIFT else (0.0,)
        return shifts, amplitudes


# Options added after plan schema 4, written only where set: a conversion that does not use them writes the same
# config (in the plan and the model's metadata) as the version before them, byte for byte, which older versions read.
LATER_OPTIONS = {"reparam_attention": False, "target": "portable", "activations": "symmetric",
                 "attention_probabilities": True, "balance_channels": False, "balance_alpha": 0.25}
# ``mixed_images`` as a config without a bits budget records it (0.1.0's first default, 1), and reads back as the
# default: without mixed precision it changes nothing, so neither may it change the bytes of a plan or model
UNBUDGETED_MIXED_IMAGES = 1

ENUM_FIELDS = (("method", Method, "method"), ("noise", NoiseMode, "noise mode"),
               ("mixed_sensitivity", MixedSensitivity, "mixed-precision sensitivity"),
               ("weight_rounding", WeightRounding, "weight rounding"), ("target", Target, "target"))


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    Weights are symmetric per-output-channel, activations symmetric per-tensor, both with ``*_bits``
    signed codes. ``exclude`` holds fnmatch patterns on layer names; a pattern that matches no layer is
    an error, so a typo cannot silently leave a layer in float.
    """

    method: Method = dataclasses.field(default=Method.NOISYQUANT, metadata=option(
        "scale choice: minmax, easyquant (cosine search), noisyquant (easyquant + noisy bias), ptq4vit (easyquant with "
        "PTQ4ViT's twin-uniform quantizers after Softmax and GELU) or noisyquant-ptq4vit. The twin-uniform quantizer "
        "costs a float select (Less/Where) over every attention map and GELU output and a second integer matmul per "
        "such layer: on ViT-S/14 (AVX-512 VNNI, batch 8) its W8A8 model took about 1.6x the default's batch time, "
        "0.7x FP32's, where uniform quantizers take about 0.45x", "method"))
    # None: the target's (Target.w_bits)
    w_bits: int | None = dataclasses.field(default=None, metadata=option(
        "weight bits", "target", choices=SUPPORTED_BITS,
        default_text="8 (on the portable and x86-avx2 targets with int8-paired storage, exact on every CPU)"))
    a_bits: int = dataclasses.field(default=8, metadata=option("activation bits", "target", choices=SUPPORTED_BITS))
    seed: int = dataclasses.field(default=0, metadata=option("seed of the image choice and the noise", "data"))
    calib_size: int = dataclasses.field(default=128, metadata=option("calibration images to use", "data"))
    batch_size: int = dataclasses.field(default=8, metadata=option("calibration batch size", "data"))
    exclude: tuple[str, ...] = dataclasses.field(default=(), metadata=option(
        "leave layers matching this fnmatch pattern in float (repeatable; must match something)", "target",
        metavar="PATTERN"))
    # Q K^T (and A V where attention_probabilities) on integer kernels
    quantize_attention_matmuls: bool = dataclasses.field(default=True, metadata=option(
        "quantize the attention matmuls on integer kernels (Q@K^T, and A@V with --attention-probabilities; "
        "--no-attention-matmuls keeps both in float)", "target", flag="--attention-matmuls"))
    # A V too, as the paper does: a uniform 8-bit attention map loses most small probabilities (on the real
    # ViT-S/14 leaving A V in float halves the W8A8 output error)
    attention_probabilities: bool = dataclasses.field(default=False, metadata=option(
        "quantize A@V's attention map too, as the paper does (off: A@V stays float: a uniform 8-bit attention map "
        "loses most small probabilities; on the real ViT-S/14 leaving A@V in float halves the W8A8 output error)",
        "target", applies=ATTENTION))
    # store N and B' as int16 codes (opset 21 Q/DQ; the model is upgraded to opset 21)
    int16_bias: bool = dataclasses.field(default=False, metadata=option(
        "store the noise N and denoised biases B' as int16 codes (upgrades the model to opset 21)", "target"))
    target: Target = dataclasses.field(default=Target.PORTABLE, metadata=option(
        "where the model will run: portable (exact on every CPU), x86-avx2 (the same rule), x86-vnni or arm64 (int8 "
        "weights everywhere: their fastest kernels, saturating on x86 without VNNI), gpu (TensorRT's Q/DQ: "
        "symmetric int8 activations with zero point 0; no twin-uniform, asymmetric or int16-bias options)",
        "target", plan_fixed=False))
    # None: the target's (:attr:`Target.weight_dtype`)
    weight_dtype: WeightDtype | None = dataclasses.field(default=None, metadata=option(
        "weight code storage: int8-paired (int8, each pair of codes the U8S8 kernel adds into one int16 kept to "
        "|q1| + |q2| <= 128: exact on every CPU, the fast kernels), auto (int8 where no two codes can overflow a "
        "16-bit pair sum, uint8 with zero point 128 elsewhere: exact on every CPU, slower), uint8, or int8 "
        "(unconstrained: only for VNNI/AMX x86 or ARM64 targets, saturates on x86 without VNNI)", "target",
        plan_fixed=False, default_text="int8-paired; int8 for the x86-vnni, arm64 and gpu targets"))
    # None: the target's (symmetric for gpu, asymmetric elsewhere)
    activations: Activations | None = dataclasses.field(default=None, metadata=option(
        "symmetric per-tensor codes, or asymmetric uint8 codes anchored at the calibrated minimum of each skewed "
        f"tensor (|min| <= {SKEW:g} max: GELU outputs)", "target", default_text="asymmetric; symmetric for the gpu "
                                                                                  "target"))
    noise: NoiseMode = dataclasses.field(default=NoiseMode.BOTH, metadata=option(
        "what NoisyQuant's vector N may hold: paper (the paper's uniform noise, its width searched), shift (a "
        "per-channel mean shift) or both", "method", applies=NOISY))
    reparam: bool = dataclasses.field(default=True, metadata=option(
        "LayerNorm reparameterization first: equal channel ranges for the per-tensor quantizer of every "
        "LayerNorm-fed input (qkv, fc1), folded exactly into the LayerNorm and the layers", "method"))
    balance_channels: bool = dataclasses.field(default=True, metadata=option(
        "channel balancing first: every GELU output read by linear layers divided by per-channel factors in an "
        "explicit Mul, the rows of the weights that read it multiplied by them, so one activation step serves every "
        "channel (one elementwise Mul per MLP at inference)", "method"))
    balance_alpha: float = dataclasses.field(default=0.25, metadata=option(
        "migration strength of channel balancing: factors (range_k / mean range) ** ALPHA, from 0 (none) to 1 (every "
        "channel one range)", "method", metavar="ALPHA",
        applies=Condition(lambda c: c.balance_channels, lambda c: "it applies with --balance-channels only")))
    reparam_attention: bool = dataclasses.field(default=False, metadata=option(
        "attention reparameterization first: each K channel centred (the Softmax ignores it) and each Q/K channel "
        "pair balanced, folded exactly into the qkv (or q and k) layers", "method"))
    weight_rounding: WeightRounding = dataclasses.field(default=WeightRounding.GPTQ, metadata=option(
        "nearest; gptq (second-order: each rounding error pushed onto the not yet rounded inputs through the "
        "inverse input Hessian, kept per layer where it lowers the held-out output error); or gptq-act (GPTQ fitted "
        "to the float output from the layer's quantized input, its activation error included)", "method",
        applies=SEARCHED))
    bias_correction: bool = dataclasses.field(default=True, metadata=option(
        "fold each layer's mean output error on the calibration sample into its bias, kept per layer where it "
        "lowers the held-out output error", "method", applies=SEARCHED))
    # mixed precision (nq_onnx.search.mixed): every group and its layers' weights take 4, 5, 6 or 8 bits, chosen from
    # PTQ-ViT's nuclear-norm sensitivities with the weight- and activation-count-weighted average at most this
    bits_budget: float | None = dataclasses.field(default=None, metadata=option(
        "mixed precision: each group and its layers' weights take 4, 5, 6 or 8 bits, the weight- and "
        "activation-count-weighted average at most BITS", "method", metavar="BITS", default_text="none: one width"))
    mixed_sensitivity: MixedSensitivity = dataclasses.field(default=MixedSensitivity.OUTPUT, metadata=option(
        "how --bits-budget rates a group: output (the model output's error with the group alone quantized); joint "
        "(its change when the group's width moves with every other group at the budget's uniform width); searched "
        "(as joint, with the quantizers the method's uniform search at each width chose: a search per width, about "
        "5x the time); or nuclear (PTQ-ViT's nuclear-norm-weighted error of the outputs it feeds)", "method",
        applies=BUDGETED))
    # fit images the output / joint / searched sensitivities are measured on (at most the fit images). 4: on the
    # real ViT-S/14 a 6.0-bit budget gained +3.4 points over uniform W6A6 on three seeds' mean with NoisyQuant +
    # reparam, against +1.9 with 1 (README, Mixed precision)
    mixed_images: int = dataclasses.field(default=4, metadata=option(
        "fit images the output, joint and searched sensitivities are measured on (at most the search's fit images; "
        "the sensitivity pass's time grows with N)", "method", metavar="N", applies=BUDGETED))
    search: SearchConfig = dataclasses.field(default_factory=SearchConfig)
    # the settings of the enabled techniques that keep their own (:mod:`nq_onnx.core.technique`), one per technique
    techniques: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        self._check_search()
        self._check_techniques()
        for name, kind, label in ENUM_FIELDS:
            _coerce_enum(self, name, kind, label)
        if self.weight_dtype is None:
            object.__setattr__(self, "weight_dtype", self.target.weight_dtype)
        if self.activations is None:
            object.__setattr__(self, "activations", Activations.SYMMETRIC if self.target == Target.GPU
                               else Activations.ASYMMETRIC)
        if self.w_bits is None:
            object.__setattr__(self, "w_bits", self.target.w_bits)  # 8 everywhere, as a bits budget needs
        _coerce_enum(self, "weight_dtype", WeightDtype, "weight dtype")
        _coerce_enum(self, "activations", Activations, "activations")
        self._check_target()
        for settings in self.techniques:  # a technique's settings may refuse what the rest of the config asks
            check = getattr(settings, "check", None)
            if check is not None:
                check(self)
        for name in ("w_bits", "a_bits"):
            bits = getattr(self, name)
            if bits not in SUPPORTED_BITS:
                raise ConfigError(
                    f"{name.replace('_', '-')} must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits}"
                )
        if self.bits_budget is not None:
            if not 4 <= self.bits_budget <= 8:
                raise ConfigError(f"bits-budget must be between 4 and 8 (average bits), got {self.bits_budget:g}")
            if self.method == Method.MINMAX:
                raise ConfigError("bits-budget needs a searched method (easyquant, noisyquant, ...), not minmax")
            if (self.w_bits, self.a_bits) != (8, 8):
                raise ConfigError("bits-budget chooses every layer's bits: leave w-bits and a-bits at 8")
        if self.mixed_sensitivity == MixedSensitivity.SEARCHED and self.method.twin:
            raise ConfigError(f"mixed-sensitivity searched needs uniform activation quantizers; {self.method.value}'s "
                              "twin-uniform ones change constants with their width")
        if self.mixed_sensitivity == MixedSensitivity.SEARCHED and self.activations == Activations.ASYMMETRIC:
            raise ConfigError("mixed-sensitivity searched needs uniform symmetric activation quantizers; add "
                              "--activations symmetric")
        if not 0.0 <= self.balance_alpha <= 1.0:
            raise ConfigError(f"balance-alpha must be between 0 and 1, got {self.balance_alpha:g}")
        if self.mixed_images < 1:
            raise ConfigError(f"mixed-images must be at least 1, got {self.mixed_images}")
        if self.calib_size < 1:
            raise ConfigError(f"calib-size must be at least 1, got {self.calib_size}")
        if self.batch_size < 1:
            raise ConfigError(f"batch-size must be at least 1, got {self.batch_size}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def _check_search(self) -> None:
        """``search`` as a :class:`SearchConfig`: one given as a dict of its fields is built from it."""
        if isinstance(self.search, dict):
            object.__setattr__(self, "search", search_config(self.search))
        elif not isinstance(self.search, SearchConfig):
            kind = type(self.search).__name__
            raise ConfigError(f"search must be a SearchConfig or a dict of its fields, got {kind}")

    def _check_techniques(self) -> None:
        """One registered technique's settings each, held in name order (the order does not change the model);
        settings that leave their technique off (``enabled`` false) are dropped."""
        named = sorted(((technique_of(s).name, s) for s in self.techniques if settings_on(s)),
                       key=lambda pair: pair[0])
        for (first, _), (second, _) in zip(named, named[1:]):
            if first == second:
                raise ConfigError(f"technique {first!r} is given twice")
        object.__setattr__(self, "techniques", tuple(s for _, s in named))

    def _check_target(self) -> None:
        """Refuse, in one line, an option the target cannot run."""
        target = self.target.value
        if self.target.exact_everywhere and self.weight_dtype == WeightDtype.INT8:
            raise ConfigError(f"target {target} is exact on every CPU: weight-dtype int8 can saturate on x86 without "
                              "VNNI; use weight-dtype int8-paired, auto or uint8, or target x86-vnni or arm64")
        if self.target != Target.GPU:
            return
        if self.method.twin:
            raise ConfigError(f"target gpu cannot run method {self.method.value}: its twin-uniform quantizer needs a "
                              "float select and uint8 codes, which TensorRT does not fuse")
        if self.activations == Activations.ASYMMETRIC:
            raise ConfigError("target gpu takes symmetric int8 activations (zero point 0); use activations symmetric")
        if self.int16_bias:
            raise ConfigError("target gpu cannot run int16-bias (TensorRT dequantizes int8 only)")
        if self.weight_dtype == WeightDtype.UINT8:
            raise ConfigError("target gpu takes int8 weights; use weight-dtype int8 or auto")

    @property
    def weight_pair_limit(self) -> int | None:
        """The bound on ``|q_2i| + |q_2i+1|`` that ``int8-paired`` storage keeps (``None``: no such bound)."""
        return quant.KERNEL_PAIR_LIMIT if self.weight_dtype == WeightDtype.INT8_PAIRED else None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(dataclasses.replace(self, techniques=()))
        del out["techniques"]  # written only where a technique is on: a plan without one reads as before they existed
        if self.techniques:
            out["techniques"] = {technique_of(s).name: settings_to_dict(s) for s in self.techniques}
        for name, _, _ in ENUM_FIELDS + (("weight_dtype", WeightDtype, ""), ("activations", Activations, "")):
            out[name] = getattr(self, name).value
        out["search"]["objective"] = self.search.objective.value
        for name, default in LATER_OPTIONS.items():
            if out[name] == default:
                del out[name]
        if self.bits_budget is None:  # it decides nothing then: recorded as plans before its default moved had it
            out["mixed_images"] = UNBUDGETED_MIXED_IMAGES
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        data = dict(data)
        if data.get("bits_budget") is None:  # recorded at a fixed value where it decides nothing (to_dict)
            data.pop("mixed_images", None)
        if "target" not in data and data.get("weight_dtype") == WeightDtype.INT8.value:
            data["target"] = Target.X86_VNNI.value  # int8 weights everywhere, written before targets existed
        for name, old in LATER_OPTIONS.items():  # a plan written before the option existed ran its old behaviour
            data.setdefault(name, old)
        search = search_config(data.pop("search", {}))
        techniques = tuple(settings_from_dict(name, v) for name, v in data.pop("techniques", {}).items())
        return cls(search=search, techniques=techniques, **data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "QuantConfig":
        """``QuantConfig.preset("paper", w_bits=6, a_bits=6)``: preset ``name`` (:data:`PRESETS`: ``fast``,
        ``accurate``, ``paper``) with ``overrides`` on top; ``search`` may be a SearchConfig, or a dict of its fields
        over the preset's."""
        values = dict(preset_values(name))
        search = dict(values.pop("search", {}))
        given = overrides.pop("search", None)
        values["search"] = given if isinstance(given, SearchConfig) else search_config({**search, **(given or {})})
        return cls(**{**values, **overrides})


def search_config(fields: dict[str, Any]) -> SearchConfig:
    """A :class:`SearchConfig` from a dict of its fields (lists, as JSON and TOML give them, become tuples); an
    unknown field or a value of the wrong kind is a one-line ConfigError."""
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(SearchConfig)})
    if unknown:
        raise ConfigError(f"unknown search option {unknown[0]!r}")
    try:
        return SearchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except TypeError as exc:  # a comparison or unpacking of a value of the wrong kind
        raise ConfigError(f"search options {sorted(fields)}: {exc}") from None



register_section("quant", QuantConfig, root=True)
register_section("search", SearchConfig, parent_field="search")
