"""Which results file goes into which docs page: every generated section of the docs, and the one function that
rewrites them (``python benchmarks/table.py --docs``).

A section sits in its page between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``. Each is rendered from the
results files its patterns match (each file states its own CPU, kernels and settings); charts are drawn into
``docs/assets/`` beside the pages that show them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from table import RESULTS, conditions_line, cpu_markdown, demo_markdown, markdown, methods_markdown, overhead_markdown

ROOT = RESULTS.parent.parent
ASSETS = ROOT / "docs" / "assets"
Files = list[tuple[dict, Path]]  # each results file's contents and its path relative to the repository


def _each(render: Callable[[dict, Path], str]) -> Callable[[Files, Path], str]:
    """A renderer of one file applied to every matched file, one block each."""
    return lambda files, page: "\n\n".join(render(data, source) for data, source in files)


def _chart(name: str, draw: Callable[[dict, Path], None], render: Callable[[dict, Path, str], str]):
    """A renderer that draws a chart into ``docs/assets/NAME`` and links it relatively from the page."""
    def go(files: Files, page: Path) -> str:
        (data, source), = files
        out = ASSETS / name
        ASSETS.mkdir(parents=True, exist_ok=True)
        draw(data, out)
        return render(data, source, os.path.relpath(ROOT / "docs" / "assets" / name, page.parent))
    return go


def _copy(path: Path, out: Path) -> None:
    shutil.copyfile(path, out)


def _theorem(files: Files, page: Path) -> str:
    from theorem import theorem_markdown

    def render(data: dict, source: Path, chart: str) -> str:
        return f"{theorem_markdown(data, source, chart)} {conditions_line(data, source)}"

    return _chart("theorem.png", lambda data, out: _copy(RESULTS / "theorem.png", out), render)(files, page)


def _additivity(files: Files, page: Path) -> str:
    from table_mixed import additivity_markdown

    return _each(additivity_markdown)(files, page)


def _profile(name: str):
    def go(files: Files, page: Path) -> str:
        from table_profile import profile_chart, profile_markdown

        return _chart(name, profile_chart, profile_markdown)(files, page)
    return go


def _module(module: str) -> Callable[[Files, Path], str]:
    """``module.markdown`` of a benchmark script (error_share, bottleneck), applied to every file, with the
    settings the file was measured under."""
    def go(files: Files, page: Path) -> str:
        render = __import__(module).markdown
        return _each(lambda data, source: f"{render(data, source)} {conditions_line(data, source)}")(files, page)
    return go


def _cost(files: Files, page: Path) -> str:
    from table_cost import cost_markdown

    return _each(cost_markdown)(files, page)


@dataclass(frozen=True)
class Section:
    page: str  # relative to the repository
    name: str  # the marker's name
    pattern: str  # a glob in benchmarks/results
    render: Callable[[Files, Path], str]


def _tradeoff(files: Files, page: Path) -> str:
    """The trade-off study of ``methods.py`` runs with its chart (``tradeoff_vnni.png``)."""
    from table_tradeoff import study_markdown, tradeoff_chart

    ASSETS.mkdir(parents=True, exist_ok=True)
    tradeoff_chart(files[0][0], ASSETS / "tradeoff_vnni.png")
    return study_markdown(files, os.path.relpath(ROOT / "docs" / "assets" / "tradeoff_vnni.png", page.parent))


def _sweep(flags: bool = False) -> Callable[[Files, Path], str]:
    """A sweep's study table from its results file (``.jsonl``, read by ``table_sweep``); with ``flags`` its
    configurations named by their ``convert`` flags, with each seed's top-1."""
    def go(files: Files, page: Path) -> str:
        from table_sweep import seeds_markdown

        return _each(lambda _, source: seeds_markdown(ROOT / source, source, flags))(files, page)
    return go


def _sweep_chart(name: str, kind: str) -> Callable[[Files, Path], str]:
    """A sweep's results with a chart drawn into ``docs/assets/NAME``: ``tradeoff`` (the README's results: top-1
    and output MSE against latency) or ``bits`` (the study table under a chart of top-1 against average bits)."""
    def go(files: Files, page: Path) -> str:
        from table_sweep import bits_chart, seeds_markdown, tradeoff_chart, tradeoff_markdown

        (_, source), = files
        ASSETS.mkdir(parents=True, exist_ok=True)
        chart = os.path.relpath(ROOT / "docs" / "assets" / name, page.parent)
        if kind == "tradeoff":
            tradeoff_chart(ROOT / source, ASSETS / name)
            return tradeoff_markdown(ROOT / source, source, chart)
        bits_chart(ROOT / source, ASSETS / name)
        return f"![top-1 against average bits]({chart})\n\n{seeds_markdown(ROOT / source, source)}"
    return go


def _default_line(files: Files, page: Path) -> str:
    """The README's sentence on the default over the seeds of ``benchmarks/sweeps/defaults.toml``."""
    from table_sweep import default_line

    return _each(lambda _, source: default_line(ROOT / source, source))(files, page)


SECTIONS = (
    Section("README.md", "results", "sweep_defaults/results.jsonl", _sweep_chart("tradeoff.png", "tradeoff")),
    Section("docs/studies/fast-and-accurate.md", "tradeoff", "tradeoff_vnni*.json", _tradeoff),
    Section("README.md", "seeds", "sweep_defaults/results.jsonl", _default_line),
    Section("docs/studies/fast-and-accurate.md", "variants", "sweep_defaults/results.jsonl", _sweep(flags=True)),
    Section("docs/getting-started.md", "demo", "demo.json", _each(demo_markdown)),
    Section("docs/studies/attribution.md", "benchmark", "full.json", _each(markdown)),
    Section("docs/studies/attribution.md", "ablation", "ablation_w6a6.json", _each(markdown)),
    Section("docs/studies/theorem.md", "theorem", "theorem.json", _theorem),
    Section("docs/studies/methods.md", "sweep-methods", "sweep_methods/results.jsonl", _sweep()),
    Section("docs/studies/methods.md", "methods-vnni", "methods_vnni.json", _each(methods_markdown)),
    Section("docs/studies/methods.md", "bottleneck", "bottleneck_*.json", _module("bottleneck")),
    Section("docs/studies/methods.md", "error-share", "error_share_*.json", _module("error_share")),
    Section("docs/studies/mixed-precision.md", "sweep-mixed", "sweep_mixed/results.jsonl",
            _sweep_chart("mixed.png", "bits")),
    Section("docs/studies/mixed-precision.md", "mixed-additivity", "mixed_additivity.json", _additivity),
    Section("docs/studies/exactness.md", "cpu-exact", "cpu_exact_x86_*.json", _each(cpu_markdown)),
    Section("docs/studies/exactness.md", "cpu-exact-emulated", "cpu_exact_emulated_*.json",
            _module("cpu_exact_emulated")),
    Section("docs/studies/exactness.md", "noise-overhead", "noise_overhead.json", _each(overhead_markdown)),
    Section("docs/studies/compile-cost.md", "profile-skylakex", "profile_vnni_skylakex.json",
            _profile("profile_vnni_skylakex.png")),
    Section("docs/studies/compile-cost.md", "profile-haswell", "profile_vnni_haswell.json",
            _profile("profile_vnni_haswell.png")),
    Section("docs/studies/compile-cost.md", "compile-cost-vnni", "compile_cost_vnni_skylakex.json", _cost),
    Section("docs/studies/compile-cost.md", "compile-cost-avx2", "compile_cost.json", _cost),
    Section("docs/studies/compile-cost.md", "ir-cost", "ir_cost.json", _module("ir_cost")),
    Section("docs/guides/sweep.md", "sweep-scaling", "cluster_run.json", _module("cluster_run")),
)


def replace_block(text: str, name: str, body: str, where: str) -> str:
    """``text`` with the block between NAME's markers replaced by ``body``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{where} has no {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    return f"{head}{begin}\n{body}\n{end}{rest.split(end, 1)[1]}"


def render(section: Section, root: Path = ROOT) -> str:
    """One section's Markdown from the results files its pattern matches (an error if none does)."""
    paths = sorted(RESULTS.glob(section.pattern))
    if not paths:
        raise SystemExit(f"no results file matches {section.pattern} for {section.page}")
    files = [(json.loads(p.read_text()) if p.suffix == ".json" else {}, p.resolve().relative_to(root)) for p in paths]
    return section.render(files, root / section.page)


def update_docs(root: Path = ROOT) -> None:
    """Rewrite every generated section of every page in :data:`SECTIONS`."""
    pages: dict[str, str] = {}
    for section in SECTIONS:
        text = pages.get(section.page) or (root / section.page).read_text()
        pages[section.page] = replace_block(text, section.name, render(section, root), section.page)
    for page, text in pages.items():
        (root / page).write_text(text)
