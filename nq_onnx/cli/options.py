"""``nq-onnx convert``'s configuration options, generated from the fields' declarations (:mod:`nq_onnx.core.options`).

Each declared field of each registered section becomes one flag whose parsed value lands in ``args`` under
``"<section>.<field>"`` only when given (``argparse.SUPPRESS``), so the resolution knows what the user set.
The configuration is resolved in layers, each over the one before: the dataclasses' defaults, ``--preset``,
``--config FILE``, the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from nq_onnx.core import options
from nq_onnx.cli.config_file import Layer, layer_from_mapping, read_file
from nq_onnx.core.presets import PRESETS, preset_values


def argument_groups(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """An argparse group per registered help group, in registration order."""
    return {name: parser.add_argument_group(g.title, g.description or None) for name, g in options.GROUPS.items()}


def add_config_options(parser: argparse.ArgumentParser, groups: dict[str, argparse._ArgumentGroup]) -> None:
    """A flag for every declared field of every registered section, in its help group."""
    for section in options.sections():
        types = options.field_types(section.cls)
        for field, opt in options.declared(section.cls):
            if opt.group not in groups:
                groups[opt.group] = parser.add_argument_group(opt.group)
            _add_field(groups[opt.group], section.name, field, opt, types[field.name])


def _add_field(group, section: str, field: dataclasses.Field, opt: options.Option, hint: Any) -> None:
    flag = options.flag_of(field)
    kind, _ = options.optional_inner(hint)
    kwargs: dict[str, Any] = {"dest": f"{section}.{field.name}", "default": argparse.SUPPRESS,
                              "help": f"{opt.help} (default: {options.describe_default(field)})"}
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif getattr(kind, "__origin__", None) is tuple:
        kwargs.update(action="append", metavar=opt.metavar or flag[2:].upper().replace("-", "_"))
    elif options.is_enum(kind):
        kwargs["choices"] = [m.value for m in kind]
    else:
        kwargs.update(type=kind, choices=opt.choices, metavar=opt.metavar)
        if opt.choices is None:
            kwargs["metavar"] = opt.metavar or flag[2:].upper().replace("-", "_")
    group.add_argument(flag, **kwargs)


def flag_layer(args: argparse.Namespace) -> Layer:
    """``{section: {field: value}}`` of the configuration flags given on the command line."""
    layer: Layer = {}
    for dest, value in vars(args).items():
        section, _, name = dest.partition(".")
        if name and section in options.SECTIONS:
            layer.setdefault(section, {})[name] = tuple(value) if isinstance(value, list) else value
    return layer


def preset_layer(name: str | None) -> Layer:
    return {} if name is None else layer_from_mapping(preset_values(name), f"preset {name}")


@dataclasses.dataclass
class Resolved:
    """A resolved configuration: every section's config, and where each set field came from."""

    configs: dict[str, Any]
    layers: dict[str, Layer]  # "preset", "file", "flags" -> the fields each set

    @property
    def config(self):
        return self.configs[options.root_section().name]

    def source(self, section: str, name: str) -> str | None:
        """The last layer that set the field (``flags``, ``file``, ``preset``), or ``None``: its default."""
        return next((k for k in ("flags", "file", "preset") if name in self.layers[k].get(section, {})), None)


def resolve(args: argparse.Namespace) -> Resolved:
    """The configuration of ``args``: defaults < ``--preset`` < ``--config`` < flags; a bad value, key or file is a
    one-line ConfigError before any work."""
    file_layer = {}
    if getattr(args, "config", None):
        file_layer = layer_from_mapping(read_file(args.config), f"config file {args.config}")
    layers = {"preset": preset_layer(getattr(args, "preset", None)), "file": file_layer, "flags": flag_layer(args)}
    merged: Layer = {}
    for layer in layers.values():
        for section, values in layer.items():
            merged.setdefault(section, {}).update(values)
    return Resolved(build(merged), layers)


def build(values: Layer) -> dict[str, Any]:
    """Every registered section's config from ``values`` (absent fields take the dataclass defaults)."""
    built: dict[str, Any] = {}
    for section in options.sections():
        fields = dict(values.get(section.name, {}))
        if section.root:
            fields |= {s.parent_field: built[s.name] for s in options.SECTIONS.values() if s.parent_field}
            joined = tuple(built[s.name] for s in options.SECTIONS.values()
                           if s.joins_root is not None and s.joins_root(built[s.name]))
            if joined:
                fields[options.TECHNIQUES_FIELD] = joined
        try:
            built[section.name] = section.cls(**fields)
        except TypeError as exc:  # a section whose constructor refuses a declared field: a bug, not the input
            raise RuntimeError(f"section {section.name}: {exc}") from exc
    return built


def ignored(resolved: Resolved, load_plan: bool) -> list[str]:
    """Warnings for options that will do nothing: with a loaded plan, every setting it fixes; otherwise a flag whose
    condition (:class:`~nq_onnx.core.options.Condition`) fails on the built config."""
    root = resolved.config
    by_reason: dict[str, list[str]] = {}
    for section in options.SECTIONS.values():
        for field in dataclasses.fields(section.cls):
            opt = field.metadata.get(options.OPTION)
            source = resolved.source(section.name, field.name)
            if source is None or (section.root and field.name in _nested()):
                continue
            if load_plan and (opt is None or opt.plan_fixed):
                reason = "the loaded plan fixes these settings"
            elif source == "flags" and opt and opt.applies and not opt.applies.holds(root):
                reason = opt.applies.reason(root)
            else:
                continue
            by_reason.setdefault(reason, []).append(_name(source, field))
    last = {"--config": 1, "--preset": 2}  # flags first, in declaration order, then the file and the preset
    return [f"{', '.join(sorted(dict.fromkeys(names), key=lambda n: last.get(n, 0)))} ignored: {reason}"
            for reason, names in by_reason.items()]


def _nested() -> set[str]:
    return options.held_fields()


def _name(source: str, field: dataclasses.Field) -> str:
    if source == "flags":
        return options.flag_of(field)
    return "--preset" if source == "preset" else "--config"


def preset_help() -> str:
    """``--preset``'s help: each preset's purpose and the flags it stands for."""
    parts = []
    for name, preset in PRESETS.items():
        flags = " ".join(_as_flags(preset.values)) or "no option"
        parts.append(f"{name}: {preset.summary} ({flags})")
    return "start from a named setting; options given explicitly override it. " + "; ".join(parts)


def _as_flags(values: dict[str, Any]) -> list[str]:
    layer = layer_from_mapping(values, "preset")
    words = []
    for section in options.sections():
        fields = {f.name: f for f in dataclasses.fields(section.cls)}
        for name, value in layer.get(section.name, {}).items():
            flag = options.flag_of(fields[name])
            if isinstance(value, bool):
                words.append(flag if value else "--no-" + flag[2:])
            else:
                words.append(f"{flag} {value}")
    return words

