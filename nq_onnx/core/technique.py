"""The technique interface: what a quantization technique plugs into, and the registry that holds them.

A technique is one module. It subclasses :class:`Technique`, overrides the hooks it needs and registers itself
with :func:`register`; the pipeline (:mod:`nq_onnx.pipeline`) and the search (:mod:`nq_onnx.search.planner`) call the
hooks of every enabled technique, in registration order, at fixed points of a conversion::

    tensors(ctx)            before calibration    the float tensors whose statistics it needs beyond the groups'
    rewrite(ctx)            after calibration     rewrite the float model (and the statistics) from what was measured
    replay(ctx)             a loaded plan         the same rewrite, from what the plan recorded
    assign_bits(...)        before the search     each group's width (mixed precision)
    group_quantizers(...)   before the search     an activation quantizer in place of the uniform one, per group
    plan_group(...)         in the search         change a group's plan before the layers that read it are finished
    finish_layer(...)       in the search         change a layer's codes or bias once its steps are chosen
    finish(ctx)             after the search      record what ``rewrite`` chose in the plan

A technique with settings of its own declares them as a frozen dataclass (``settings``) whose fields declare their
command-line options (:func:`nq_onnx.core.options.option`) and whose class attribute ``VERSION`` numbers its layout.
Registering the technique registers the dataclass as a configuration section: its flags appear in ``nq-onnx
convert --help``, its table in ``--config`` files, and an enabled instance (``enabled`` true) joins
:attr:`QuantConfig.techniques <nq_onnx.core.config.QuantConfig.techniques>`, which plans and models record
(``{"name": {"version": ..., field: value}}``) and :func:`settings_from_dict` reads back. Settings may define
``check(config)``, which the configuration calls once it is complete, to refuse in one ``ConfigError`` what the
technique cannot run with the rest of it (a target, a missing option). Techniques whose settings
are :class:`~nq_onnx.core.config.QuantConfig` fields (the reparameterizations) say when they are on in :meth:`enabled`.

The built-in techniques (:mod:`nq_onnx.techniques.builtin`) are loaded by name the first time the registry is asked
which techniques a conversion runs, as plug-ins are: they build on the search machinery above this module, and
nothing below them imports them. This module imports nothing of the project at import time but the options
registry, so that the configuration, the search and the pipeline may all import it.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from nq_onnx.core import options
from nq_onnx.core.errors import ConfigError, PlanError

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from nq_onnx.calibration.collect import TensorStats
    from nq_onnx.core.config import QuantConfig
    from nq_onnx.passes.base import Skip
    from nq_onnx.passes.find_layers import GroupSpec, Layers
    from nq_onnx.search.planner import SearchPlanner
    from nq_onnx.core.plan import GroupPlan, Plan


@dataclasses.dataclass
class Context:
    """The state a conversion's techniques read and change: the float model and its layers (current after every
    rewrite), the calibration statistics, the plan (``None`` until the search made it, or the loaded one), what
    could not be done (``skipped``, in the summary), the seconds per stage (``timings``) and each technique's own
    state between its hooks (``state[name]``)."""

    model: onnx.ModelProto
    layers: Layers
    config: QuantConfig
    stats: dict[str, TensorStats] = dataclasses.field(default_factory=dict)
    plan: Plan | None = None
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    state: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class GroupQuantizer:
    """A technique's activation quantizer for one group, the uniform quantizer it must beat on the held-out rows
    (``fallback``; the search keeps whichever is better), the names the layer metrics record the two under
    (``("twin", "uniform")``: ``mse_twin_held_out``, ``twin_rejected``, ...), for a twin-uniform quantizer the
    :class:`~nq_onnx.core.plan.TwinSpec` the plan records, and the grid of NoisyQuant's mean shift the fallback's own
    search may take (``fallback_shifts``; ``None``: the configuration's)."""

    quantizer: Any
    fallback: Any
    names: tuple[str, str]
    twin: Any = None
    fallback_shifts: tuple[float, ...] | None = None


@dataclasses.dataclass
class LayerFinish:
    """One searched linear layer as the techniques that finish it read and change it, in turn.

    Given: ``operand`` (its float weight ``[K, N]``, bias and weight quantizer), the searched per-channel ``scales``,
    the fit input ``rows``, ``checked``: the rows that decide what a technique keeps (held-out images' where there
    are any), with ``noisy_input`` (``X + N``), ``output(w_q)`` and ``mse(output, delta)``
    (:class:`nq_onnx.search.rounding.LayerRows`), and the activation quantizer ``act``, its ``scale`` and the
    ``noise``.
    Decided: ``codes`` (``None``: nearest rounding of the steps), ``weight`` (their ``dq``), ``output`` (the layer's
    output on the checked rows with that weight, ``None`` until a technique computes it), ``correction`` (added to
    the bias) and ``metrics`` (recorded in the plan)."""

    operand: Any
    scales: Any
    rows: Any
    checked: Any
    act: Any
    scale: float
    noise: Any
    weight: Any
    codes: Any = None
    output: Any = None
    correction: Any = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


class Technique:
    """A quantization technique's hooks (module docstring); each does nothing unless overridden.

    ``name`` is its registry key, its configuration section and its key in plans; ``settings`` its configuration
    dataclass (``None``: its settings are fields of :class:`~nq_onnx.core.config.QuantConfig`); ``group`` the help group
    of its flags (registered with ``title`` and ``description``)."""

    name: ClassVar[str]
    settings: ClassVar[type | None] = None
    group: ClassVar[str] = "method"
    title: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def enabled(self, config: QuantConfig) -> bool:
        """Whether the technique takes part in a conversion with ``config``: by default, whether ``config`` holds
        settings of its kind."""
        return self.settings_in(config) is not None

    def settings_in(self, config: QuantConfig) -> Any | None:
        """This technique's settings in ``config`` (``None``: not there)."""
        return next((s for s in config.techniques if type(s) is self.settings), None)

    def tensors(self, ctx: Context) -> list[str]:
        return []

    def rewrite(self, ctx: Context) -> None:
        pass

    def replay(self, ctx: Context) -> None:
        pass

    def group_quantizers(self, config: QuantConfig, layers: Layers, stats: dict[str, TensorStats],
                         bits: dict[str, int], unsigned: frozenset[str],
                         chosen: dict[str, GroupQuantizer]) -> dict[str, GroupQuantizer]:
        """Quantizers for the groups this technique quantizes otherwise than uniformly; ``bits``: a group's width
        where it is not ``config.a_bits``; ``unsigned``: the groups whose uniform codes are unsigned; ``chosen``: what
        the techniques before this one chose."""
        return {}

    def plan_group(self, config: QuantConfig, group: GroupSpec, rows: np.ndarray, planned: GroupPlan) -> GroupPlan:
        """The plan of ``group`` given the searched one, ``planned``; ``rows`` are the group's input rows on the
        search's fit images, through the quantized earlier layers."""
        return planned

    def assign_bits(self, planner: SearchPlanner, inputs: dict[str, np.ndarray],
                    progress: Callable | None) -> tuple[dict[str, int], dict[str, Any]] | None:
        """Each group's width and what decided it (its cost and sensitivities, :class:`~nq_onnx.core.plan.Module`),
        before the search; ``planner`` is the search about to run (its model, layers, statistics, float weights and
        settings), ``inputs`` its images. ``None``: this technique assigns no widths."""
        return None

    def finish_layer(self, config: QuantConfig, layer: LayerFinish) -> None:
        """Change ``layer``'s decided fields (its codes, weight, correction, metrics) once its steps are chosen."""

    def finishes_layers(self) -> bool:
        """Whether the technique overrides :meth:`finish_layer` (a layer no technique finishes keeps nearest
        rounding and its bias, and costs no extra work)."""
        return type(self).finish_layer is not Technique.finish_layer

    def finish(self, ctx: Context) -> None:
        pass


TECHNIQUES: dict[str, Technique] = {}
BUILTIN = "nq_onnx.techniques.builtin"  # the module whose import registers the built-in techniques


def load_builtin() -> None:
    """Register the built-in techniques (once: a module is imported once)."""
    importlib.import_module(BUILTIN)


def registered() -> dict[str, Technique]:
    """Every registered technique by name, the built-in ones included (loaded first, so that a reader of the
    registry before any conversion, such as a sweep file read through the API, sees them)."""
    load_builtin()
    return TECHNIQUES


def register(cls: type[Technique]) -> type[Technique]:
    """Class decorator: register technique ``cls`` (and its settings as a configuration section). The built-in
    techniques are registered first, whenever this is called, so that the order hooks run in (built-ins, then the
    others in their registration order) does not depend on whether a conversion ran before."""
    load_builtin()  # during the built-ins' own import this returns the module being imported
    name = cls.name
    if name in TECHNIQUES and type(TECHNIQUES[name]) is not cls:
        raise ValueError(f"a technique named {name!r} is registered already")
    if cls.settings is not None:
        if not isinstance(getattr(cls.settings, "VERSION", None), int):
            raise TypeError(f"technique {name!r}: its settings class needs an integer VERSION")
        if cls.group not in options.GROUPS:
            options.register_group(cls.group, cls.title or cls.group, cls.description)
        options.register_section(name, cls.settings, joins_root=settings_on)
    TECHNIQUES[name] = cls()
    return cls


def settings_on(settings: Any) -> bool:
    """Whether a technique's settings turn it on: their ``enabled`` property, where they have one."""
    return bool(getattr(settings, "enabled", True))


def unregister(name: str) -> None:
    """Remove technique ``name``, its section and its help group (a test's technique, after the test)."""
    TECHNIQUES.pop(name, None)
    options.unregister(name)


def enabled(config: QuantConfig) -> list[Technique]:
    """The techniques that take part in a conversion with ``config``, in registration order."""
    return [t for t in registered().values() if t.enabled(config)]


def technique_of(settings: Any) -> Technique:
    """The registered technique whose settings class ``settings`` is an instance of."""
    found = next((t for t in registered().values() if t.settings is not None and type(settings) is t.settings), None)
    if found is None:
        raise ConfigError(f"{type(settings).__name__} is not the settings of a registered technique")
    return found


def settings_to_dict(settings: Any) -> dict[str, Any]:
    """A technique's settings as a plan records them: its fields, enums as their values, and ``version``."""
    out = {"version": type(settings).VERSION}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        out[f.name] = getattr(value, "value", value)
    return out


def settings_from_dict(name: str, data: dict[str, Any]) -> Any:
    """The settings of technique ``name`` recorded as ``data``; a technique that is not registered, or a layout newer
    than the registered one reads, is a PlanError."""
    technique = registered().get(name)
    if technique is None or technique.settings is None:
        raise PlanError(f"the plan uses technique {name!r}, which is not registered here (import the module that "
                        "registers it first)")
    data = dict(data)
    version = data.pop("version", 1)
    if version > technique.settings.VERSION:
        raise PlanError(f"technique {name!r} settings version {version} is newer than this one reads "
                        f"({technique.settings.VERSION})")
    try:
        return technique.settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    except TypeError as exc:
        raise PlanError(f"technique {name!r}: malformed settings ({exc})") from None
