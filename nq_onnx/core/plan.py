"""The plan: every searched scale and sampled noise vector of a conversion, as a typed value.

A plan is what calibration and search produce and what the graph passes consume. It is saved as
``NAME.json`` (schema version, model digest, settings, per-layer scalars) plus ``NAME.npz`` (the vectors),
both written deterministically, and loading it against a model with another digest is a
:class:`~nq_onnx.core.errors.PlanError`. The noise vector ``N`` that ``insert_noise`` adds and the one that
``fold_denoising_bias`` folds are the same stored array, never a re-seeded copy.
"""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np


from nq_onnx.core.atomic import write_bytes_atomic
from nq_onnx.core.config import QuantConfig
from nq_onnx.core.errors import PlanError
from nq_onnx.core.quantizers import ActQuantizer, WeightQuantizer
from nq_onnx.core.two_range import SplitSoftmax, TwinGelu, TwinSoftmax

SCHEMA_VERSION = 7  # 3: reparameterization (GroupPlan.reparam), GPTQ codes and bias correction (LayerPlan);
# 4: mixed precision (QuantConfig.bits_budget, GroupPlan.precision); 5: attention reparameterization (LayerPlan);
# 6: channel balancing (GroupPlan.balance); 7: value balancing (GroupPlan.value_balance)
READABLE_SCHEMAS = (2, 3, 4, 5, 6, 7)  # an older plan is a newer one without the features added since


@dataclasses.dataclass(frozen=True)
class Module:
    """A group's cost (weights + activation values per image) and its sensitivity at each bit choice, under a bits
    budget (:mod:`nq_onnx.search.mixed` chooses the widths from them)."""

    name: str
    cost: int
    sensitivity: dict[int, float]


def modules_average_bits(modules: list[Module], bits: dict[str, int]) -> float:
    """The cost-weighted average width of ``modules`` at ``bits``."""
    total = sum(m.cost for m in modules)
    return sum(m.cost * bits[m.name] for m in modules) / total if total else 0.0


@dataclasses.dataclass(frozen=True)
class TwinSpec:
    """A group quantized in two ranges, each with its own integer matmul: ``kind`` ``softmax`` or ``gelu`` (PTQ4ViT's
    twin-uniform quantizer) or ``split`` (:class:`~nq_onnx.core.two_range.SplitSoftmax`), and its fixed step (the
    coarse ``d2 = 1 / L`` of a softmax or split group, the negative range's ``d1`` of a GELU group); the searched one
    is the group's ``scale``."""

    kind: str
    fixed: float

    KINDS = ("softmax", "gelu", "split")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise PlanError(f"unknown two-range quantizer kind {self.kind!r} in the plan; this version reads "
                            f"{', '.join(self.KINDS)}")

    def quantizer(self, bits: int) -> TwinSoftmax | TwinGelu | SplitSoftmax:
        if self.kind == "split":
            return SplitSoftmax(bits)
        return TwinSoftmax(bits) if self.kind == "softmax" else TwinGelu(bits, self.fixed)


@dataclasses.dataclass
class Reparam:
    """A group's LayerNorm reparameterization: its layers read ``X' = (X - shift) / scale`` (per input channel)."""

    scale: np.ndarray
    shift: np.ndarray


@dataclasses.dataclass
class AttentionReparam:
    """A scores matmul's reparameterization (:mod:`nq_onnx.passes.reparam_attention`): over its pairs of Q and K
    channels, ``Q' = Q * scale`` and ``K' = (K - shift) / scale``."""

    scale: np.ndarray
    shift: np.ndarray


@dataclasses.dataclass
class GroupPlan:
    """Activation quantization of one group: per-tensor step, and the noise ``N`` added before it."""

    name: str
    tensor: str
    scale: float
    bits: int
    noise: np.ndarray | None = None
    noise_shift: float = 0.0
    noise_amplitude: float = 0.0
    signed: bool = True  # False: a non-negative tensor, codes [0, 2^b - 1] with zero point 0
    input_range: tuple[float, float] | None = None  # calibrated min and max of X (for the report)
    base_scale: float | None = None  # the EasyQuant step before the noise search (for the report)
    reparam: Reparam | None = None  # folded into the float model before the search (``QuantConfig.reparam``)
    twin: TwinSpec | None = None  # PTQ4ViT's twin-uniform quantizer instead of one uniform range
    precision: Module | None = None  # its cost and sensitivity per bit-width under a bits budget (search.mixed)
    low: float | None = None  # asymmetric: the calibrated minimum its codes are anchored at (ActQuantizer.low)
    balance: np.ndarray | None = None  # channel balancing: its layers read X / balance (``--balance-channels``)
    value_balance: np.ndarray | None = None  # value balancing: X / value_balance, folded into V (``--balance-values``)

    def quantizer(self) -> ActQuantizer | TwinSoftmax | TwinGelu | SplitSoftmax:
        """The group's activation quantizer, the same object the search scored and the passes emit."""
        if self.twin is None:
            return ActQuantizer(self.bits, self.signed, self.low)
        return self.twin.quantizer(self.bits)


@dataclasses.dataclass
class LayerPlan:
    """Weight quantization of one layer: per-output-channel steps (``None`` for activation matmuls)."""

    name: str
    weight_scales: np.ndarray | None
    bits: int
    search: dict[str, float] = dataclasses.field(default_factory=dict)
    weight_codes: np.ndarray | None = None  # int8 [K, N] where not nearest rounding of the steps (GPTQ)
    bias_correction: np.ndarray | None = None  # added to the layer's bias
    attention: AttentionReparam | None = None  # a scores matmul's K centring and Q/K balance, folded before the search

    def codes(self, w_kn: np.ndarray, pair_limit: int | None = None) -> np.ndarray:
        """The layer's integer weight codes: the stored ones, or ``w_kn`` rounded to the nearest code (within the
        kernel pairs' ``pair_limit`` where given: :meth:`QuantConfig.weight_pair_limit`)."""
        if self.weight_codes is not None:
            return self.weight_codes
        return WeightQuantizer(self.bits, pair_limit).codes(w_kn, self.weight_scales)


@dataclasses.dataclass
class Plan:
    model_digest: str
    config: QuantConfig
    groups: dict[str, GroupPlan] = dataclasses.field(default_factory=dict)
    layers: dict[str, LayerPlan] = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def written_schema(self) -> int:
        """The oldest schema that holds the plan: 4 where no attention is reparameterized and no group balanced (a
        plan as the version before schema 5 wrote it, byte for byte, with the config's
        :data:`~nq_onnx.core.config.LATER_OPTIONS` unset), 5 where no group is balanced, 6 where no group's values
        are."""
        if self.schema_version != SCHEMA_VERSION or any(g.value_balance is not None for g in self.groups.values()):
            return self.schema_version
        if any(g.balance is not None for g in self.groups.values()):
            return 6
        return 5 if any(p.attention is not None for p in self.layers.values()) else 4

    def check_model(self, digest: str) -> None:
        if digest != self.model_digest:
            raise PlanError(
                f"plan belongs to another model (plan digest {self.model_digest[:12]}, model digest {digest[:12]})"
            )

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``path`` (JSON) and the ``.npz`` beside it, atomically; returns both paths."""
        json_path = Path(path)
        npz_path = json_path.with_suffix(".npz")
        arrays: dict[str, np.ndarray] = {}
        doc: dict[str, Any] = {
            "schema_version": self.written_schema(),
            "model_digest": self.model_digest,
            "config": self.config.to_dict(),
            "arrays": npz_path.name,
            "groups": [],
            "layers": [],
        }
        for g in self.groups.values():
            entry = {
                "name": g.name,
                "tensor": g.tensor,
                "scale": float(g.scale),
                "bits": g.bits,
                "noise_shift": g.noise_shift,
                "noise_amplitude": g.noise_amplitude,
                "noise": None,
                "signed": g.signed,
                "input_range": list(g.input_range) if g.input_range else None,
                "base_scale": g.base_scale,
                "reparam": None,
                "twin": dataclasses.asdict(g.twin) if g.twin is not None else None,
            }
            if g.low is not None:
                entry["low"] = g.low
            if g.balance is not None:
                entry["balance"] = f"group/{g.name}/balance"
                arrays[entry["balance"]] = g.balance
            if g.value_balance is not None:
                entry["value_balance"] = f"group/{g.name}/value_balance"
                arrays[entry["value_balance"]] = g.value_balance
            if g.noise is not None:
                entry["noise"] = f"group/{g.name}/noise"
                arrays[entry["noise"]] = g.noise
            if g.reparam is not None:
                entry["reparam"] = _store_factors(f"group/{g.name}/reparam", g.reparam, arrays)
            if g.precision is not None:
                entry["precision"] = {"cost": g.precision.cost,
                                      "sensitivity": {str(b): v for b, v in g.precision.sensitivity.items()}}
            doc["groups"].append(entry)
        for layer in self.layers.values():
            entry = {"name": layer.name, "bits": layer.bits, "search": layer.search, "weight_scales": None,
                     "weight_codes": None, "bias_correction": None}
            for key in ("weight_scales", "weight_codes", "bias_correction"):
                if getattr(layer, key) is not None:
                    entry[key] = f"layer/{layer.name}/{key}"
                    arrays[entry[key]] = getattr(layer, key)
            if layer.attention is not None:
                entry["attention"] = _store_factors(f"layer/{layer.name}/attention", layer.attention, arrays)
            doc["layers"].append(entry)
        write_bytes_atomic(npz_path, _npz_bytes(arrays))
        write_bytes_atomic(json_path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
        return json_path, npz_path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        json_path = Path(path)
        try:
            doc = json.loads(json_path.read_text())
        except FileNotFoundError:
            raise PlanError(f"plan file not found: {json_path}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PlanError(f"{json_path} is not a plan (invalid JSON: {exc})") from None
        if not isinstance(doc, dict) or "schema_version" not in doc:
            raise PlanError(f"{json_path} is not an nq-onnx plan (no schema_version)")
        if doc["schema_version"] not in READABLE_SCHEMAS:
            raise PlanError(f"{json_path} has plan schema {doc['schema_version']}, this nq-onnx reads "
                            f"{', '.join(map(str, READABLE_SCHEMAS))}")
        npz_path = json_path.parent / doc.get("arrays", json_path.with_suffix(".npz").name)
        try:
            with np.load(npz_path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except FileNotFoundError:
            raise PlanError(f"plan arrays not found: {npz_path}") from None
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise PlanError(f"plan arrays {npz_path} are unreadable: {exc}") from None
        try:
            plan = cls(model_digest=doc["model_digest"], config=QuantConfig.from_dict(doc["config"]))
            for g in doc["groups"]:
                noise = arrays[g["noise"]].astype(np.float32) if g["noise"] else None
                reparam = _load_factors(Reparam, g.get("reparam"), arrays)
                plan.groups[g["name"]] = GroupPlan(
                    g["name"],
                    g["tensor"],
                    float(g["scale"]),
                    int(g["bits"]),
                    noise,
                    float(g["noise_shift"]),
                    float(g["noise_amplitude"]),
                    bool(g["signed"]),
                    tuple(g["input_range"]) if g.get("input_range") else None,
                    g.get("base_scale"),
                    reparam,
                    TwinSpec(str(g["twin"]["kind"]), float(g["twin"]["fixed"])) if g.get("twin") else None,
                    _module(g["name"], g["precision"]) if g.get("precision") else None,
                    None if g.get("low") is None else float(g["low"]),
                    arrays[g["balance"]].astype(np.float32) if g.get("balance") else None,
                    arrays[g["value_balance"]].astype(np.float32) if g.get("value_balance") else None,
                )
            for layer in doc["layers"]:
                scales, codes, correction = (arrays[layer[k]] if layer.get(k) else None
                                             for k in ("weight_scales", "weight_codes", "bias_correction"))
                plan.layers[layer["name"]] = LayerPlan(
                    layer["name"], None if scales is None else scales.astype(np.float32), int(layer["bits"]),
                    dict(layer["search"]), None if codes is None else codes.astype(np.int8),
                    None if correction is None else correction.astype(np.float32),
                    _load_factors(AttentionReparam, layer.get("attention"), arrays))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"{json_path} is a malformed plan ({type(exc).__name__}: {exc})") from None
        return plan


def _store_factors(prefix: str, factors: Reparam | AttentionReparam, arrays: dict[str, np.ndarray]) -> dict:
    """A reparameterization's entry in the plan's JSON: the names of its ``scale`` and ``shift`` arrays."""
    entry = {"scale": f"{prefix}_scale", "shift": f"{prefix}_shift"}
    arrays[entry["scale"]], arrays[entry["shift"]] = factors.scale, factors.shift
    return entry


def _load_factors(kind: type, entry: dict | None, arrays: dict[str, np.ndarray]):
    """The :class:`Reparam` or :class:`AttentionReparam` an entry of :func:`_store_factors` names (``None``: none)."""
    if not entry:
        return None
    return kind(arrays[entry["scale"]].astype(np.float32), arrays[entry["shift"]].astype(np.float32))


def _module(name: str, entry: dict) -> Module:
    return Module(name, int(entry["cost"]), {int(b): float(v) for b, v in entry["sensitivity"].items()})


def average_bits(groups: dict[str, GroupPlan]) -> float | None:
    """The cost-weighted average bits of a mixed-precision plan (``None`` without a bits budget)."""
    modules = [g.precision for g in groups.values() if g.precision is not None]
    if not modules:
        return None
    return modules_average_bits(modules, {g.name: g.bits for g in groups.values()})


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` whose bytes depend only on the arrays (fixed timestamps, sorted names)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            data = io.BytesIO()
            np.lib.format.write_array(data, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            zf.writestr(info, data.getvalue())
    return buffer.getvalue()
