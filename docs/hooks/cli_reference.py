"""MkDocs hook: the command-line reference, rendered from ``nq_onnx.cli.build_parser()`` at build time.

A page that contains ``<!-- cli-reference -->`` gets, in its place, every subcommand's usage, description and
options (grouped as the parser groups them), so the reference cannot drift from ``nq-onnx --help``.
"""

from __future__ import annotations

import argparse

MARKER = "<!-- cli-reference -->"
EXIT_MARKER = "<!-- cli-exit-codes -->"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _flags(action: argparse.Action) -> str:
    names = action.option_strings or [action.metavar or action.dest]
    if action.nargs == 0:
        return ", ".join(f"`{n}`" for n in names)
    value = action.metavar or (f"{{{','.join(map(str, action.choices))}}}" if action.choices else action.dest.upper())
    return ", ".join(f"`{n} {value}`" if action.option_strings else f"`{n}`" for n in names)


def _group_table(parser: argparse.ArgumentParser, group) -> list[str]:
    formatter = parser._get_formatter()
    rows = [a for a in group._group_actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]
    if not rows:
        return []
    lines = [f"**{group.title}**" if group.title else "", "", "| option | meaning |", "|---|---|"]
    for action in rows:
        help_text = formatter._expand_help(action) if action.help else ""
        lines.append(f"| {_flags(action)} | {_cell(help_text)} |")
    return lines + [""]


def _usage(parser: argparse.ArgumentParser, width: int = 110) -> str:
    """The usage line wrapped at a fixed width, whatever the terminal that builds the site."""
    formatter = parser.formatter_class(prog=parser.prog, width=width)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return formatter.format_help().rstrip()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def cli_markdown(parser: argparse.ArgumentParser | None = None) -> str:
    """The reference of every subcommand of ``parser`` (default: ``nq_onnx.cli.build_parser()``) as Markdown."""
    if parser is None:
        from nq_onnx.cli import build_parser

        parser = build_parser()
    lines = []
    for name, sub in _subcommands(parser).items():
        lines += [f"## `{parser.prog} {name}`", "", sub.description or "", "", "```text", _usage(sub), "```", ""]
        for group in sub._action_groups:
            lines += _group_table(sub, group)
    return "\n".join(lines)


def exit_codes_markdown() -> str:
    """``nq_onnx.cli.EXIT_CODES`` (what ``nq-onnx --help`` lists) as a table."""
    from nq_onnx.cli import EXIT_CODES

    return "\n".join(["| status | meaning |", "|---|---|"] + [f"| {c} | {_cell(m)} |" for c, m in EXIT_CODES])


def on_page_markdown(markdown: str, page, config, files) -> str:
    if EXIT_MARKER in markdown:
        markdown = markdown.replace(EXIT_MARKER, exit_codes_markdown())
    return markdown.replace(MARKER, cli_markdown()) if MARKER in markdown else markdown
