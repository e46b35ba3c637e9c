"""The report's opening sections: the verdict (:func:`nq_onnx.report.summary.verdict`'s rows, the same the summary
prints) and the settings, every config field with its value, then the versions, the CPU and the command line."""

from __future__ import annotations

import dataclasses
import enum
import html
import shlex
from typing import Sequence

import numpy as np

from nq_onnx.core.version import __version__
from nq_onnx.io.cpu import cpu_features


def settings_rows(config) -> list[tuple[str, str]]:
    """Every field of a config dataclass and its value as text, nested dataclasses' fields as ``outer.inner``."""
    rows = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            rows += [(f"{field.name}.{name}", text) for name, text in settings_rows(value)]
        else:
            rows.append((field.name, setting_text(value)))
    return rows


def setting_text(value) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ", ".join(setting_text(v) for v in value) if value else "none"
    return str(value)


def environment_rows(command: str | Sequence[str] | None = None, calib_images: int = 0) -> list[tuple[str, str]]:
    """The versions the conversion ran with, the CPU, the calibration inputs and the command line (when given; a
    list of arguments is quoted as a shell would need)."""
    import onnxruntime

    cpu = cpu_features()
    rows = [("nq-onnx", __version__), ("onnxruntime", onnxruntime.__version__), ("numpy", np.__version__),
            ("CPU", f"{cpu.model or 'unnamed'} ({cpu.kind}; flags: {' '.join(cpu.flags) or 'none found'})")]
    if calib_images:
        rows.append(("calibration inputs", str(calib_images)))
    if command:
        rows.append(("command", command if isinstance(command, str) else shlex.join(command)))
    return rows


def verdict_html(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th scope=\"row\">{html.escape(what)}</th><td>{html.escape(value)}</td></tr>"
                   for what, value in rows)
    return f'<h2>Verdict</h2>\n<table id="verdict"><tbody>{body}</tbody></table>'


def settings_html(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><td>{html.escape(name)}</td><td>{html.escape(value)}</td></tr>" for name, value in rows)
    return (f'<h2>Settings</h2>\n<table id="settings"><thead><tr><th>setting</th><th>value</th></tr></thead>'
            f"<tbody>{body}</tbody></table>")
