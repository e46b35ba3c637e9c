"""Typed, validated configuration for a conversion.

Everything a conversion depends on is a field here, so a config plus a model plus data plus a seed
determine the output bytes. Invalid values raise :class:`~nq_onnx.errors.ConfigError` at construction.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from nq_onnx.errors import ConfigError

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
    """What NoisyQuant's fixed vector ``N`` before a linear layer may hold (see :mod:`nq_onnx.search`).

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
    :mod:`nq_onnx.rounding`)."""

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
    """How mixed precision (``bits_budget``) measures a group's sensitivity to its bit-width (:mod:`nq_onnx.mixed`).

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
    """How weight codes are stored, which decides onnxruntime's CPU kernel (see :mod:`nq_onnx.cpu`).

    ``auto`` (default): int8 where no 16-bit pair sum can overflow (:func:`nq_onnx.quant.u8s8_safe`), uint8
    with zero point 128 elsewhere: exact on every CPU. ``uint8``: every layer uint8 (U8U8 kernels). ``int8``:
    every layer int8 (U8S8), for deployments on VNNI/AMX x86 or ARM64 only: on x86 without VNNI full-range
    codes saturate, and ``nq-onnx inspect --strict`` fails on such a model.
    """

    AUTO = "auto"
    UINT8 = "uint8"
    INT8 = "int8"


class Activations(str, enum.Enum):
    """How activation groups are quantized per tensor (:class:`~nq_onnx.quantizers.ActQuantizer`).

    ``symmetric``: scale-only codes around zero (unsigned from zero where calibration saw no negative value).
    ``asymmetric``: as ``symmetric``, except that a positively skewed group (calibrated minimum below zero but at
    most ``SKEW`` of its maximum in magnitude: a GELU output, ``>= -0.17``) takes uint8 codes anchored at its
    minimum, with its zero point following the searched step: on such a tensor a symmetric range wastes nearly
    half of its codes on negative values it never takes.
    """

    SYMMETRIC = "symmetric"
    ASYMMETRIC = "asymmetric"


SKEW = 0.25  # an asymmetric group's |minimum| / maximum at most this (symmetric codes would waste 40 % or more)


class Target(str, enum.Enum):
    """Where the model will run, which decides weight storage, activation types and Q/DQ placement.

    ``portable`` (default): exact on every CPU: a layer stores int8 weights only where no 16-bit pair sum of
    onnxruntime's U8S8 kernel can saturate on an x86 CPU without VNNI (``weight_dtype auto``), uint8 elsewhere.
    ``x86-avx2``: the same rule (it is that CPU's). ``x86-vnni`` and ``arm64``: int8 weights everywhere, the fast
    kernels of CPUs whose integer sums are 32-bit (VNNI/AMX x86, ARM64 dot products). ``gpu``: what TensorRT's Q/DQ
    fusion expects: int8 weights, symmetric int8 activations with zero point 0, Q/DQ on both inputs of every
    quantized matmul and none elsewhere; no twin-uniform quantizer (a float select and uint8 codes), no asymmetric
    activations, no int16 biases.
    """

    PORTABLE = "portable"
    X86_AVX2 = "x86-avx2"
    X86_VNNI = "x86-vnni"
    ARM64 = "arm64"
    GPU = "gpu"

    @property
    def weight_dtype(self) -> "WeightDtype":
        """The weight storage this target runs fastest while staying exact on it."""
        return WeightDtype.AUTO if self in (Target.PORTABLE, Target.X86_AVX2) else WeightDtype.INT8

    @property
    def exact_everywhere(self) -> bool:
        return self in (Target.PORTABLE, Target.X86_AVX2)

    @property
    def w_bits(self) -> int:
        """The default weight width: 7 where the model must be exact on every CPU (int8 codes in +-63 cannot
        saturate a 16-bit pair sum against any uint8 activation, ``2 * 255 * 63 < 2^15``, and run on the fast int8
        kernels), 8 elsewhere."""
        return 7 if self.exact_everywhere else 8


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
    images, which no search saw (``0``: no such check).

    Candidate activation steps of EasyQuant's alternating search are screened: with ``screen_tokens > 0`` every
    candidate is scored on that many of the fit rows (a stratified sample, :func:`nq_onnx.grids.screen_rows`) and
    only the ``screen_keep`` best of them on all rows (:func:`nq_onnx.grids.grid_argmax`). On the real ViT-S/14 the
    full search's best step was the screen's first or second in all 192 searches (W8A8 and W6A6); ``screen_tokens
    = 0`` scores every candidate on every row (``benchmarks/compile_cost.py`` measures both). The noise search and
    the attention-matmul search choose exactly what scoring every candidate in full would.

    The output of a ViT classifier reads one token (the class token; :func:`nq_onnx.passes.find_layers.read_tokens`
    finds it in the graph), yet a search over all tokens weighs it as one row in hundreds and will clip values only
    it carries. ``read_token_share`` gives the rows of the read tokens that share of each linear group's fit and
    held-out samples (repeated; the rest drawn from the other tokens, :func:`nq_onnx.search.search_sample`; 0:
    every row counts once). On the real ViT-S/14 a share of 0.5 roughly halved NoisyQuant W8A8's held-out output
    MSE and cut W6A6's by a quarter (``benchmarks/compile_cost.py``, the ``*_uniform_rows`` rows against the
    default ones); a model that pools every token (Swin) has no read token and is unaffected.

    With ``grid_stride > 1`` every grid is searched coarse to fine (:func:`nq_onnx.grids.grid_argmax`): every
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
    tokens: int = 1024
    read_token_share: float = 0.5
    screen_tokens: int = 256
    screen_keep: int = 3
    search_images: int = 8
    holdout_images: int = 4
    sequential: bool = True
    grid_stride: int = 1
    objective: Objective = Objective.COSINE
    ranking_loss: float = 0.0  # gamma of PTQ-ViT's ranking loss on attention scores (Q K^T); 0: off
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
                 "attention_probabilities": True}
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

    method: Method = Method.NOISYQUANT
    w_bits: int | None = None  # None: the target's (Target.w_bits), or 8 under a bits budget
    a_bits: int = 8
    seed: int = 0
    calib_size: int = 128
    batch_size: int = 8
    exclude: tuple[str, ...] = ()
    quantize_attention_matmuls: bool = True  # Q K^T (and A V where attention_probabilities) on integer kernels
    # A V too, as the paper does: a uniform 8-bit attention map loses most small probabilities (on the real
    # ViT-S/14 leaving A V in float halves the W8A8 output error)
    attention_probabilities: bool = False
    int16_bias: bool = False  # store N and B' as int16 codes (opset 21 Q/DQ; the model is upgraded to opset 21)
    target: Target = Target.PORTABLE
    weight_dtype: WeightDtype | None = None  # None: the target's (:attr:`Target.weight_dtype`)
    activations: Activations | None = None  # None: the target's (symmetric for gpu, asymmetric elsewhere)
    noise: NoiseMode = NoiseMode.BOTH  # NoisyQuant only: what N may hold
    reparam: bool = True  # LayerNorm reparameterization before the search (nq_onnx.reparam)
    reparam_attention: bool = False  # K centred and Q/K channels balanced before the search (nq_onnx.reparam)
    weight_rounding: WeightRounding = WeightRounding.GPTQ
    bias_correction: bool = True  # fold each layer's mean output error into its bias
    # mixed precision (nq_onnx.mixed): every group and its layers' weights take 4, 5, 6 or 8 bits, chosen from
    # PTQ-ViT's nuclear-norm sensitivities with the weight- and activation-count-weighted average at most this
    bits_budget: float | None = None
    mixed_sensitivity: MixedSensitivity = MixedSensitivity.OUTPUT
    # fit images the output / joint / searched sensitivities are measured on (at most the fit images). 4: on the
    # real ViT-S/14 a 6.0-bit budget gained +3.4 points over uniform W6A6 on three seeds' mean with NoisyQuant +
    # reparam, against +1.9 with 1 (README, Mixed precision)
    mixed_images: int = 4
    search: SearchConfig = dataclasses.field(default_factory=SearchConfig)

    def __post_init__(self) -> None:
        for name, kind, label in ENUM_FIELDS:
            _coerce_enum(self, name, kind, label)
        if self.weight_dtype is None:
            object.__setattr__(self, "weight_dtype", self.target.weight_dtype)
        if self.activations is None:
            object.__setattr__(self, "activations", Activations.SYMMETRIC if self.target == Target.GPU
                               else Activations.ASYMMETRIC)
        if self.w_bits is None:
            object.__setattr__(self, "w_bits", 8 if self.bits_budget is not None else self.target.w_bits)
        _coerce_enum(self, "weight_dtype", WeightDtype, "weight dtype")
        _coerce_enum(self, "activations", Activations, "activations")
        self._check_target()
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
        if self.mixed_images < 1:
            raise ConfigError(f"mixed-images must be at least 1, got {self.mixed_images}")
        if self.calib_size < 1:
            raise ConfigError(f"calib-size must be at least 1, got {self.calib_size}")
        if self.batch_size < 1:
            raise ConfigError(f"batch-size must be at least 1, got {self.batch_size}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def _check_target(self) -> None:
        """Refuse, in one line, an option the target cannot run."""
        target = self.target.value
        if self.target.exact_everywhere and self.weight_dtype == WeightDtype.INT8:
            raise ConfigError(f"target {target} is exact on every CPU: weight-dtype int8 can saturate on x86 without "
                              "VNNI; use weight-dtype auto or uint8, or target x86-vnni or arm64")
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

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
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
        search = data.pop("search", {})
        search = {k: tuple(v) if isinstance(v, list) else v for k, v in search.items()}
        return cls(search=SearchConfig(**search), **data)
