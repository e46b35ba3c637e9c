"""Command-line declarations of configuration fields, and the registry of configuration sections.

A field of a configuration dataclass declares its option once, next to its default::

    a_bits: int = dataclasses.field(default=8, metadata=option("activation bits", "target", choices=(4, 8)))

and the dataclass is registered as a *section* (:func:`register_section`): the command line's flag, its type and
choices (from the field's annotation and enum), its default (from the dataclass), its help group, the key of a
``--config`` file and the warning that an explicitly given flag does nothing are all generated from these
declarations. A technique with its own configuration dataclass registers its section and, if it wants one, its help
group (:func:`register_group`) from its own module; the command line then has its flags and builds its config.

A field without an option is read from and written to configuration files, but has no flag.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, Callable

OPTION = "nq_onnx.option"  # the key of a field's metadata that holds its Option


@dataclasses.dataclass(frozen=True)
class Condition:
    """When an option does something: ``holds(config)`` on the built root config, and ``reason(config)`` saying why
    not (``"method minmax searches nothing"``)."""

    holds: Callable[[Any], bool]
    reason: Callable[[Any], str]


@dataclasses.dataclass(frozen=True)
class Option:
    """A configuration field's command-line option.

    ``flag`` defaults to ``--field-name``; ``choices`` to the enum's values; ``default_text`` states the default
    where the field's default value does not (a ``None`` meaning "the target's"); ``plan_fixed``: a loaded plan
    fixes the setting, so the flag is ignored with ``--load-plan``; ``applies``: the flag does nothing unless this
    condition holds."""

    help: str
    group: str
    flag: str | None = None
    metavar: str | None = None
    choices: tuple | None = None
    default_text: str | None = None
    plan_fixed: bool = True
    applies: Condition | None = None


def option(help: str, group: str, **kwargs: Any) -> dict[str, Option]:
    """Field metadata declaring an option: ``dataclasses.field(default=..., metadata=option(...))``."""
    return {OPTION: Option(help, group, **kwargs)}


@dataclasses.dataclass(frozen=True)
class Group:
    """A titled group of options in ``--help``, in registration order."""

    name: str
    title: str
    description: str = ""


@dataclasses.dataclass(frozen=True)
class Section:
    """A registered configuration dataclass.

    The root section's fields are the top-level keys of a configuration file; every other section is a table named
    ``name``. ``parent_field``: the root config's field holding this section's instance (``search``). ``joins_root``:
    a technique's settings (:mod:`nq_onnx.core.technique`), built before the root config and held in its
    :data:`TECHNIQUES_FIELD` where ``joins_root(settings)`` holds (the technique is on)."""

    name: str
    cls: type
    root: bool = False
    parent_field: str | None = None
    joins_root: Callable[[Any], bool] | None = None


GROUPS: dict[str, Group] = {}
SECTIONS: dict[str, Section] = {}
TECHNIQUES_FIELD = "techniques"  # the root config's field holding the enabled techniques' settings


def register_group(name: str, title: str, description: str = "") -> Group:
    GROUPS[name] = Group(name, title, description)
    return GROUPS[name]


def register_section(name: str, cls: type, *, root: bool = False, parent_field: str | None = None,
                     joins_root: Callable[[Any], bool] | None = None) -> Section:
    """Register ``cls`` (a dataclass whose fields may declare options) as the configuration section ``name``."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if root and any(s.root for s in SECTIONS.values() if s.name != name):
        raise ValueError("a root section is registered already")
    SECTIONS[name] = Section(name, cls, root, parent_field, joins_root)
    return SECTIONS[name]


def unregister(name: str) -> None:
    """Remove the section and the group called ``name`` (either may be absent)."""
    SECTIONS.pop(name, None)
    GROUPS.pop(name, None)


def root_section() -> Section:
    return next(s for s in SECTIONS.values() if s.root)


def sections() -> list[Section]:
    """Nested sections first, then the techniques' settings, then the root, then the rest: the order their configs
    can be built in."""
    nested = [s for s in SECTIONS.values() if s.parent_field]
    joining = [s for s in SECTIONS.values() if s.joins_root is not None]
    rest = [s for s in SECTIONS.values() if not s.root and not s.parent_field and s.joins_root is None]
    return nested + joining + [root_section()] + rest


def held_fields() -> set[str]:
    """The root config's fields that hold other sections' configs (never a key or flag of their own)."""
    return {s.parent_field for s in SECTIONS.values() if s.parent_field} | {TECHNIQUES_FIELD}


for _name, _title, _description in (
    ("data", "data", "what to calibrate (and evaluate) on and how to prepare it"),
    ("method", "method", "how scales, noise and weights are chosen"),
    ("search", "search", "the effort of the per-group searches"),
    ("target", "target", "where the model runs: bit widths, storage and what is quantized"),
    ("output", "output", "what is written"),
    ("run", "run and logging", "presets, configuration files and what is printed"),
):
    register_group(_name, _title, _description)


def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def declared(cls: type) -> list[tuple[dataclasses.Field, Option]]:
    """The fields of ``cls`` that declare an option, with their options."""
    return [(f, f.metadata[OPTION]) for f in dataclasses.fields(cls) if OPTION in f.metadata]


def flag_of(field: dataclasses.Field) -> str:
    opt = field.metadata.get(OPTION)
    return (opt.flag if opt and opt.flag else None) or "--" + field.name.replace("_", "-")


def optional_inner(hint: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, ``(hint, False)`` otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1 and len(typing.get_args(hint)) == 2:
            return inner[0], True
    return hint, False


def is_enum(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, enum.Enum)


def default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def describe_default(field: dataclasses.Field) -> str:
    """How ``--help`` states a field's default: ``on``/``off``, an enum's value, a number, ``none``."""
    opt: Option | None = field.metadata.get(OPTION)
    if opt is not None and opt.default_text is not None:
        return opt.default_text
    value = default_of(field)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if value is None or value == ():
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)
