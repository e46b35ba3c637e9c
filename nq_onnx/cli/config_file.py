"""Configuration files (``nq-onnx convert --config FILE`` / ``--print-config``): TOML or JSON, by extension.

The root section's fields (:class:`~nq_onnx.core.config.QuantConfig`'s) are the top-level keys; every other registered
section (:mod:`nq_onnx.core.options`) is a table of its own: ``[search]``, or a technique's. Keys are field names
(``w_bits``; ``w-bits`` is read as the same key). A value ``None`` is written as nothing: TOML has no null, and an
absent key takes the field's default. An unknown key, a value of the wrong type or an enum value that does not
exist is a one-line :class:`~nq_onnx.core.errors.ConfigError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from pathlib import Path
from typing import Any

from nq_onnx.core import options
from nq_onnx.core.errors import ConfigError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

FORMATS = ("toml", "json")
Layer = dict[str, dict[str, Any]]  # section name -> field -> value


def read_file(path: str | Path) -> dict[str, Any]:
    """The mapping a TOML or JSON configuration file holds."""
    path = Path(path)
    kind = path.suffix.lower().lstrip(".")
    if kind not in FORMATS:
        raise ConfigError(f"config file {path}: expected a .toml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    try:
        data = tomllib.loads(text) if kind == "toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid {kind.upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a table of settings at the top")
    return data


def layer_from_mapping(data: dict[str, Any], source: str) -> Layer:
    """``{section: {field: value}}`` from a file's mapping, every key known and every value of its field's type."""
    root, tables = options.root_section(), {s.name: s for s in options.SECTIONS.values() if not s.root}
    layer: Layer = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in tables:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {name} must be a table of settings, got {_shown(value)}")
            layer[name] = _section_values(tables[name], value, source, f"{name}.")
        else:
            layer.setdefault(root.name, {}).update(_section_values(root, {key: value}, source, ""))
    return layer


def _section_values(section: options.Section, data: dict[str, Any], source: str, prefix: str) -> dict[str, Any]:
    types = options.field_types(section.cls)
    nested = options.held_fields()
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in types or (section.root and name in nested):
            known = ", ".join(sorted(n for n in types if not (section.root and n in nested)))
            raise ConfigError(f"{source}: unknown key {prefix + key!r} (known: {known})")
        try:
            out[name] = check_value(value, types[name])
        except ValueError as exc:
            raise ConfigError(f"{source}: {prefix + name} must be {exc}, got {_shown(value)}") from None
    return out


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (bool, list, dict, str)) or value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_value(value: Any, hint: Any) -> Any:
    """``value`` as field type ``hint`` holds it (a list as a tuple, an int as a float), or ValueError(what the type
    is, in words)."""
    inner, optional = options.optional_inner(hint)
    if value is None and optional:
        return None
    if options.is_enum(inner):
        allowed = [m.value for m in inner]
        if value not in allowed:
            raise ValueError("one of " + ", ".join(map(json.dumps, allowed)))
        return value
    origin, args = getattr(inner, "__origin__", None), getattr(inner, "__args__", ())
    if origin is tuple:
        return _check_tuple(value, args)
    checks = {bool: (lambda v: isinstance(v, bool), "true or false"),
              int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
              float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
              str: (lambda v: isinstance(v, str), "a string")}
    if inner not in checks:
        raise ValueError(f"a {getattr(inner, '__name__', inner)}")
    ok, words = checks[inner]
    if not ok(value):
        raise ValueError(words)
    return float(value) if inner is float else value


def _check_tuple(value: Any, args: tuple) -> tuple:
    if len(args) == 2 and args[1] is Ellipsis:
        words = f"a list of {_plural(args[0])}"
        if not isinstance(value, (list, tuple)):
            raise ValueError(words)
        try:
            return tuple(check_value(v, args[0]) for v in value)
        except ValueError:
            raise ValueError(words) from None
    words = "a list [" + ", ".join(_plural(a, one=True) for a in args) + "]"
    if not isinstance(value, (list, tuple)) or len(value) != len(args):
        raise ValueError(words)
    try:
        return tuple(check_value(v, a) for v, a in zip(value, args))
    except ValueError:
        raise ValueError(words) from None


def _plural(hint: Any, one: bool = False) -> str:
    words = {bool: ("boolean", "booleans"), int: ("integer", "integers"), float: ("number", "numbers"),
             str: ("string", "strings")}
    return words.get(hint, (str(hint), str(hint)))[0 if one else 1]


def plain(value: Any) -> Any:
    """A field's value as a file holds it: enums as their values, tuples as lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return value


def to_mapping(configs: dict[str, Any], omit: set[tuple[str, str]] = frozenset()) -> dict[str, Any]:
    """The file mapping of built configs (``{section: instance}``), every field but those in ``omit`` (``(section,
    field)``) and those that are ``None``."""
    out: dict[str, Any] = {}
    nested = options.held_fields()
    for section in [options.root_section()] + [s for s in options.SECTIONS.values() if not s.root]:
        table = out if section.root else out.setdefault(section.name, {})
        for f in dataclasses.fields(section.cls):
            value = getattr(configs[section.name], f.name)
            if (section.root and f.name in nested) or value is None or (section.name, f.name) in omit:
                continue
            table[f.name] = plain(value)
    return {k: v for k, v in out.items() if v != {}}


def dump(mapping: dict[str, Any], kind: str, comments: dict[str, str] | None = None) -> str:
    """``mapping`` as TOML or JSON text; TOML takes ``comments`` (``key: text``, lines under the top-level keys)."""
    if kind == "json":
        return json.dumps(mapping, indent=1) + "\n"
    lines = [f"{k} = {_toml(v)}" for k, v in mapping.items() if not isinstance(v, dict)]
    lines += [f"# {k} = {text}" for k, text in (comments or {}).items()]
    for name, table in mapping.items():
        if isinstance(table, dict):
            lines += ["", f"[{name}]"] + [f"{k} = {_toml(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else "nan" if math.isnan(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)
