"""The README and the docs site: they speak of the product only, their links resolve, their generated sections are
current, the site builds with ``mkdocs build --strict``, and the README's Python example runs."""

from __future__ import annotations

import ast
import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import mlp_model, save

import nq_onnx

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CHANGELOG = ROOT / "CHANGELOG.md"
DOC_PAGES = sorted((ROOT / "docs").rglob("*.md"))
DEMO_COMMAND = 'python3 -m venv .venv && .venv/bin/pip install -e ".[demo]" && .venv/bin/nq-onnx demo'
TEST_COMMAND = ('python3 -m venv .venv && .venv/bin/pip install -q -c constraints/cpu.txt -e ".[export,test]" && '
                ".venv/bin/python -m pytest -q")

# How a text narrates its own development instead of the product: milestones, tickets, verdicts against goals a
# reader never saw, commits as history, notes on the development machine.
BANNED = {
    "a development milestone": r"\bstops?\s*\d+|\bthis stop\b",
    "a ticket number": r"\bissues?\s*#?\d+",
    "a goal verdict": r"\*\*(?:not\s+)?(?:met|missed)\*\*|\b(?:met|missed)\b\s*[:(]|\bgoals?\b",
    "the development machine": r"shared the machine|\bthis VM\b|\bworktree\b|\bdevelopment runs?\b",
    "a commit hash": r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b",
}


def _module(path: Path, name: str):
    """A module of ``benchmarks/`` or ``docs/hooks/``, imported from its file."""
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cli_markdown() -> str:
    return _module(ROOT / "docs" / "hooks" / "cli_reference.py", "cli_reference").cli_markdown()


def _texts() -> dict[str, str]:
    texts = {str(p.relative_to(ROOT)): p.read_text() for p in [README, CHANGELOG, *DOC_PAGES]}
    texts["the generated CLI reference"] = _cli_markdown()
    return texts


@pytest.mark.parametrize("what", sorted(BANNED))
def test_no_development_history(what):
    pattern = re.compile(BANNED[what], re.IGNORECASE if what != "a commit hash" else 0)
    found = [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
             for name, text in _texts().items() for m in pattern.finditer(text)]
    assert not found, f"{what} in the product's docs:\n" + "\n".join(found)


def test_banned_patterns_catch_what_they_are_for():
    samples = {"a development milestone": "measured at stop 12", "a ticket number": "issue 14's goal",
               "a goal verdict": "W6A6 all together: **missed**", "the development machine": "shared the machine",
               "a commit hash": "in this file's history at 15175c2"}
    for what, sample in samples.items():
        assert re.search(BANNED[what], sample, re.IGNORECASE), what
    assert not re.search(BANNED["a commit hash"], "held-out MSE 0.0004584, version 0.3.31.188.0")


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@pytest.mark.parametrize("page", [README, CHANGELOG, *DOC_PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken, absolute = [], []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            absolute.append(target)
            continue
        path = target.split("#", 1)[0]
        if path and not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.name}: links to files that do not exist: {broken}"
    assert not absolute, f"{page.name}: absolute addresses (link relatively): {absolute}"


def test_readme_is_short_and_keeps_its_commands():
    text = README.read_text()
    assert len(text.splitlines()) < 250
    assert DEMO_COMMAND in text and TEST_COMMAND in text
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text()
    assert "<!-- results:begin -->" in text and "<!-- results:end -->" in text
    assert "\n## Reporting a problem\n" in text


def test_generated_sections_are_current(tmp_path, monkeypatch):
    """Every docs section ``table.py --docs`` writes is what the results files give today (charts drawn aside)."""
    table_docs = _module(ROOT / "benchmarks" / "table_docs.py", "table_docs")
    monkeypatch.setattr(table_docs, "ASSETS", tmp_path)
    for section in table_docs.SECTIONS:
        page = (ROOT / section.page).read_text()
        begin, end = f"<!-- {section.name}:begin -->\n", f"\n<!-- {section.name}:end -->"
        assert begin in page and end in page, f"{section.page} has no {section.name} markers"
        current = page.split(begin, 1)[1].split(end, 1)[0]
        assert current == table_docs.render(section), (
            f"{section.page}: section {section.name} is stale; run python benchmarks/table.py --docs")


def test_cli_reference_lists_every_option():
    from nq_onnx.cli import build_parser

    text = _cli_markdown()
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for name, sub in subparsers.items():
        assert f"## `nq-onnx {name}`" in text
        for action in sub._actions:
            for option in ([] if action.__class__.__name__ == "_HelpAction" else action.option_strings):
                assert f"`{option}" in text, f"nq-onnx {name} {option} is missing from the CLI reference"


def _readme_python() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "the README has one Python example"
    return blocks[0]


def test_readme_python_uses_only_the_public_api():
    used = {node.attr for node in ast.walk(ast.parse(_readme_python()))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "nq_onnx"}
    assert used and used <= set(nq_onnx.__all__), f"not in nq_onnx.__all__: {used - set(nq_onnx.__all__)}"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """The README's example, on a tiny model and ready input tensors instead of a ViT and a folder of images."""
    rng = np.random.default_rng(0)
    save(mlp_model(rng), tmp_path / "vit_s.onnx")
    np.save(tmp_path / "calib.npy", rng.standard_normal((8, 5, 12)).astype(np.float32))
    code = _readme_python().replace('"images/"', '"calib.npy"')
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "vit_s.nq.onnx").exists()
    assert capsys.readouterr().out.strip()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The docs site, built once with ``mkdocs build --strict``."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("mkdocs and mkdocstrings are not installed (the test extra installs them)")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_mkdocs_build_strict(site):
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert "--w-bits" in cli and "<table" in cli
    api = (site / "reference" / "api" / "index.html").read_text()
    assert all(f'id="nq_onnx.{name}"' in api for name in ("convert", "QuantConfig", "Plan", "NQError"))
    assert "Unreleased" in (site / "changelog" / "index.html").read_text()


def test_api_reference_has_no_development_history(site):
    """The API reference is rendered from docstrings, which the banned-words scan of the Markdown cannot see."""
    text = re.sub(r"<script.*?</script>|<style.*?</style>", "", (site / "reference" / "api" / "index.html").read_text(),
                  flags=re.S)
    text = html.unescape(re.sub(r"<[^>]+>", " ", text))
    found = [f"{what}: {m.group(0)!r}" for what, pattern in BANNED.items()
             for m in re.finditer(pattern, text, re.IGNORECASE if what != "a commit hash" else 0)]
    assert not found, "\n".join(found)
