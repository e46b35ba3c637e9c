"""The sweep file: what to convert, what to evaluate on, which configurations to try.

A sweep file is TOML; relative paths are relative to the file::

    model = "vit.onnx"
    calib = "calib/"                 # folder of images or .npy/.npz, as convert --calib
    seeds = [0, 1, 2]
    out = "vit.sweep"                # results, models, report (default: <file stem>.sweep beside the file)

    [eval]
    labelled = "val/"                # one sub-folder per class, or .npz with the model input (or uint8 "images")
    heldout = "heldout/"             # output error against FP32 (default: the labelled set)
    limit = 2000                     # a seeded choice of this many labelled inputs (default: all)
    # per_class = 200                # or: the first 200 inputs of each class, in source order
    heldout_limit = 200
    shard_size = 256                 # inputs per evaluation task

    [latency]
    rounds = 10                      # 0: no latency
    batch = 8
    threads = 2

    [resources]
    cpus_per_trial = 1
    trial_memory_gb = 1.5            # default: from the model's size

    [grid]                           # or [[grid]] tables: the union of their products
    method = ["easyquant", "noisyquant"]
    w_bits = [8, 6]
    reparam = [false, true]

Grid options are :class:`~nq_onnx.core.config.QuantConfig` and :class:`~nq_onnx.core.config.SearchConfig` field names
(``w_bits`` or ``w-bits``). A list means "try each"; for an option whose value is itself a list (``exclude``,
``noise_amplitudes``) a list of lists means "try each". ``"none"`` stands for no value (``bits_budget``). Each
value must be valid on its own; a combination the configuration refuses becomes a failed trial.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

from nq_onnx.core.config import QuantConfig, SearchConfig
from nq_onnx.core.errors import ConfigError
from nq_onnx.core import technique as techniques
from nq_onnx.core.options import held_fields

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

QUANT_OPTIONS = {f.name: f for f in dataclasses.fields(QuantConfig) if f.name != "seed" and f.name not in held_fields()}
SEARCH_OPTIONS = {f.name: f for f in dataclasses.fields(SearchConfig)}
TUPLE_OPTIONS = {name for name, f in {**QUANT_OPTIONS, **SEARCH_OPTIONS}.items() if "tuple" in str(f.type)}
TOP_KEYS = {"model", "calib", "seeds", "out", "eval", "latency", "resources", "grid", "base"}
SECTION_KEYS = {
    "eval": {"labelled", "heldout", "limit", "per_class", "heldout_limit", "shard_size"},
    "latency": {"rounds", "batch", "threads"},
    "resources": {"cpus_per_trial", "trial_memory_gb"},
}


@dataclasses.dataclass(frozen=True)
class Trial:
    """One conversion of the sweep: its configuration and the grid choices that made it."""

    config: QuantConfig | None  # None: the configuration refuses this combination
    options: tuple[tuple[str, Any], ...]  # (option, value) as the grid chose them, seed last
    error: str | None = None  # why the combination is refused

    @property
    def key(self) -> str:
        """The trial's identity: a digest of its complete configuration (what decides the model bytes), or of the
        grid choice the configuration refuses."""
        if self.config is None:
            return hashlib.sha256(repr(self.options).encode()).hexdigest()[:16]
        return config_key(self.config)

    def label(self, varied: frozenset[str] | None = None) -> str:
        shown = [(k, v) for k, v in self.options if varied is None or k in varied]
        return " ".join(f"{k}={_show(v)}" for k, v in shown) or "default"


def config_key(config: QuantConfig) -> str:
    text = json.dumps(config.to_dict(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A parsed, validated sweep file."""

    path: Path
    model: Path
    calib: Path
    out: Path
    seeds: tuple[int, ...]
    grid: tuple[tuple[tuple[str, tuple[Any, ...]], ...], ...]  # tables of (option, candidate values)
    labelled: Path | None = None
    heldout: Path | None = None
    limit: int | None = None
    per_class: int | None = None  # the first this many labelled inputs of each class, instead of ``limit``
    heldout_limit: int | None = None
    shard_size: int = 256
    latency_rounds: int = 10
    latency_batch: int = 8
    latency_threads: int = 2
    cpus_per_trial: int = 1
    trial_memory_gb: float | None = None

    def __post_init__(self) -> None:
        for what, path in (("model", self.model), ("calibration data", self.calib),
                           ("labelled evaluation set", self.labelled), ("held-out evaluation set", self.heldout)):
            if path is not None and not path.exists():
                raise ConfigError(f"{self.path.name}: {what} not found: {path}")
        if self.labelled is None and self.heldout is None:
            raise ConfigError(f"{self.path.name}: no evaluation set: give [eval] labelled (and/or heldout)")
        if not self.seeds:
            raise ConfigError(f"{self.path.name}: seeds is empty")
        if not self.grid or any(not dict(table) for table in self.grid):
            raise ConfigError(f"{self.path.name}: the grid is empty: give at least one option under [grid]")
        for name in ("shard_size", "latency_batch", "latency_threads", "cpus_per_trial"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{self.path.name}: {name} must be at least 1")
        for name in ("limit", "per_class", "heldout_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{self.path.name}: eval.{name} must be at least 1")
        if self.limit is not None and self.per_class is not None:
            raise ConfigError(f"{self.path.name}: give eval.limit or eval.per_class, not both")
        if self.per_class is not None and self.labelled is None:
            raise ConfigError(f"{self.path.name}: eval.per_class needs a labelled evaluation set (eval.labelled)")
        if self.latency_rounds < 0:
            raise ConfigError(f"{self.path.name}: latency.rounds must be non-negative")

    def trials(self) -> list[Trial]:
        """Every trial, in the file's order (each table's product, options as written, seeds innermost), once."""
        seen: dict[str, Trial] = {}
        for table in self.grid:
            names = [name for name, _ in table]
            for values in itertools.product(*(candidates for _, candidates in table)):
                for seed in self.seeds:
                    choice = dict(zip(names, values))
                    options = tuple(choice.items()) + (("seed", seed),)
                    try:
                        trial = Trial(make_config(choice, seed), options)
                    except ConfigError as exc:
                        trial = Trial(None, options, str(exc))
                    seen.setdefault(trial.key, trial)
        return list(seen.values())

    def varied(self) -> frozenset[str]:
        """The options that take more than one value across the sweep (what tells its trials apart)."""
        values: dict[str, set[str]] = {}
        for trial in self.trials():
            for name, value in trial.options:
                values.setdefault(name, set()).add(repr(value))
        return frozenset(name for name, seen in values.items() if len(seen) > 1) or frozenset({"seed"})


def make_config(options: dict[str, Any], seed: int) -> QuantConfig:
    """The configuration of one grid choice (raises ConfigError for a combination it refuses); ``name.field``
    options set field ``field`` of registered technique ``name``'s settings."""
    quant = {k: _value(k, v) for k, v in options.items() if k in QUANT_OPTIONS}
    search = {k: _value(k, v) for k, v in options.items() if k in SEARCH_OPTIONS}
    settings: dict[str, dict[str, Any]] = {}
    for key, value in options.items():
        if "." in key:
            name, _, field = key.partition(".")
            settings.setdefault(name, {})[field] = _value(key, value)
    try:
        chosen = tuple(techniques.registered()[name].settings(**fields) for name, fields in settings.items())
        return QuantConfig(seed=seed, search=SearchConfig(**search), **quant,
                           techniques=tuple(s for s in chosen if techniques.settings_on(s)))
    except TypeError as exc:  # a value of the wrong kind compared or unpacked inside __post_init__
        raise ConfigError(f"invalid value among {options}: {exc}") from None


def _value(name: str, value: Any) -> Any:
    if value == "none":
        return None
    return tuple(value) if name in TUPLE_OPTIONS else value


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file; any problem is one ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path.name}: not valid TOML: {exc}") from None
    _check_keys(path, data)
    base = path.parent
    sections = {name: data.get(name, {}) for name in SECTION_KEYS}
    ev, lat, res = sections["eval"], sections["latency"], sections["resources"]
    for key in ("model", "calib"):
        if not isinstance(data.get(key), str):
            raise ConfigError(f"{path.name}: {key} must be given as a path")
    resolve = lambda v: None if v is None else (base / v).resolve()  # noqa: E731
    return SweepSpec(
        path=path, model=resolve(data["model"]), calib=resolve(data["calib"]),
        out=resolve(data.get("out", f"{path.stem}.sweep")), seeds=_seeds(path, data.get("seeds", [0])),
        grid=_grid(path, data.get("grid"), data.get("base", {})), labelled=resolve(ev.get("labelled")),
        heldout=resolve(ev.get("heldout")), limit=ev.get("limit"), per_class=ev.get("per_class"),
        heldout_limit=ev.get("heldout_limit"), shard_size=ev.get("shard_size", 256),
        latency_rounds=lat.get("rounds", 10), latency_batch=lat.get("batch", 8), latency_threads=lat.get("threads", 2),
        cpus_per_trial=res.get("cpus_per_trial", 1), trial_memory_gb=res.get("trial_memory_gb"),
    )


def _check_keys(path: Path, data: dict) -> None:
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"{path.name}: unknown key {unknown[0]!r}; the keys are {', '.join(sorted(TOP_KEYS))}")
    for section, allowed in SECTION_KEYS.items():
        value = data.get(section, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{path.name}: {section} must be a table ([{section}])")
        extra = sorted(set(value) - allowed)
        if extra:
            raise ConfigError(f"{path.name}: unknown key {section}.{extra[0]}; the keys are "
                              f"{', '.join(sorted(allowed))}")


def _seeds(path: Path, seeds: Any) -> tuple[int, ...]:
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{path.name}: seeds must be a list of integers")
    return tuple(dict.fromkeys(seeds))


def _grid(path: Path, grid: Any, base: Any) -> tuple:
    """The grid's tables, each on top of ``[base]`` (options every trial takes unless its table sets them)."""
    if grid is None:
        raise ConfigError(f"{path.name}: the grid is empty: give at least one option under [grid]")
    if not isinstance(base, dict):
        raise ConfigError(f"{path.name}: base must be a table ([base])")
    tables = grid if isinstance(grid, list) else [grid]
    if not tables or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{path.name}: grid must be a table ([grid]) or tables ([[grid]])")
    return tuple(_table(path, _flat(base | t)) for t in tables)


def _table(path: Path, table: dict[str, Any]) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """One grid table as (option, candidate values) pairs, each value checked alone or, where an option needs
    another one (``split_softmax`` needs ``attention_probabilities``), beside the table's other options."""
    names = {key: _option(path, key) for key in table}
    chosen = {names[key]: _candidates(path, key, value) for key, value in table.items()}
    for key, name in names.items():
        others = {n: values[0] for n, values in chosen.items() if n != name}
        for candidate in chosen[name]:
            _check_value(path, key, name, candidate, others)
    return tuple(chosen.items())


def _flat(table: dict[str, Any]) -> dict[str, Any]:
    """A grid table with a technique's sub-table (``percentile.after = [...]``, or ``[grid.percentile]``) as
    ``name.field`` keys."""
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update({f"{key}.{field}": v for field, v in value.items()})
        else:
            out[key] = value
    return out


def _check_type(path: Path, key: str, name: str, value: Any) -> None:
    """A value of the kind the option's default is (TOML types are few: a bool is not an int, an int may be a float)."""
    if "." in name:
        section, _, field = name.partition(".")
        default = getattr(techniques.registered()[section].settings(), field)
    else:
        default = getattr(QuantConfig() if name in QUANT_OPTIONS else SearchConfig(), name)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float) or default is None:
        ok = value == "none" if default is None and isinstance(value, str) else \
            isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):  # the enums
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, (list, tuple))
    if not ok:
        raise ConfigError(f"{path.name}: grid option {key!r}: {value!r} is not a {_kind(default)}")


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "boolean"
    if isinstance(default, (int, float)) or default is None:
        return "number" + (' (or "none")' if default is None else "")
    return "string" if isinstance(default, str) else "list"


def _option(path: Path, key: str) -> str:
    name = key.replace("-", "_")
    if name == "seed":
        raise ConfigError(f"{path.name}: give seeds as the top-level seeds list, not as a grid option")
    if "." in name:
        return _technique_option(path, key, name)
    if name not in QUANT_OPTIONS and name not in SEARCH_OPTIONS:
        raise ConfigError(f"{path.name}: unknown grid option {key!r}; options are the fields of QuantConfig and "
                          "SearchConfig (w_bits, method, reparam, search_images, ...)")
    return name


def _technique_option(path: Path, key: str, name: str) -> str:
    """``name.field``: a field of registered technique ``name``'s settings."""
    section, _, field = name.partition(".")
    registry = techniques.registered()
    technique = registry.get(section)
    if technique is None or technique.settings is None:
        known = ", ".join(sorted(n for n, t in registry.items() if t.settings is not None)) or "none"
        raise ConfigError(f"{path.name}: unknown grid option {key!r}: no registered technique {section!r} has "
                          f"settings (those that do: {known})")
    fields = {f.name for f in dataclasses.fields(technique.settings)}
    if field not in fields:
        raise ConfigError(f"{path.name}: unknown grid option {key!r}; technique {section!r} has "
                          f"{', '.join(sorted(fields))}")
    return name


def _candidates(path: Path, key: str, value: Any) -> tuple:
    name = key.replace("-", "_")
    listed = isinstance(value, list) and (name not in TUPLE_OPTIONS or all(isinstance(v, list) for v in value))
    candidates = tuple(value) if listed else (value,)
    if not candidates:
        raise ConfigError(f"{path.name}: grid option {key!r} has no values")
    for candidate in candidates:
        _check_type(path, key, name, candidate)
    return tuple(tuple(c) if isinstance(c, list) else c for c in candidates)


def _check_value(path: Path, key: str, name: str, candidate: Any, others: dict[str, Any]) -> None:
    """A candidate the configuration refuses both alone and beside ``others`` is a ConfigError naming the option
    (alone first, so that the message is the value's own problem, not another option's)."""
    try:
        make_config({name: candidate}, 0)
    except ConfigError as alone:
        try:
            make_config({**others, name: candidate}, 0)
        except ConfigError:
            raise ConfigError(f"{path.name}: grid option {key!r}: {alone}") from None
