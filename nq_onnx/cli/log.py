"""What ``nq-onnx`` shows while it works: handlers for the library's loggers, and progress.

The library logs through ``logging.getLogger("nq_onnx...")`` and never prints: each stage's start and end with its
seconds (:func:`nq_onnx.core.timing.timed`, INFO; the search's parts and phases at DEBUG), and, through the progress
callable the CLI hands it, a line every ``INTERVAL`` seconds of a long loop on ``nq_onnx.progress``
(``search (noisyquant): 12/48, 40 s, ~2 min left``). On a terminal the loops show tqdm bars instead of those
lines; ``-q`` shows errors alone (the command's result is printed on stdout), ``-v`` the stages, ``-vv`` everything.
``--log-file`` receives every line with its time, whatever the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from nq_onnx.core.errors import OutputError

LOGGER = "nq_onnx"
PROGRESS = "nq_onnx.progress"
INTERVAL = 30.0  # seconds between two progress lines of one loop
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def check_log_file(path: str | None) -> None:
    """Refuse, before any work, a log file that cannot be created."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"--log-file {path} is a folder")
    if not target.parent.is_dir():
        raise OutputError(f"--log-file {path}: folder {target.parent} does not exist")


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"nq-onnx: error: {message}"
        return f"warning: {message}" if record.levelno >= logging.WARNING else message


def console_level(verbose: int, quiet: bool) -> int:
    if quiet:
        return logging.ERROR
    return {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)


def _console_filter(level: int, progress_lines: bool) -> Callable[[logging.LogRecord], bool]:
    def keep(record: logging.LogRecord) -> bool:
        if not getattr(record, "console", True):  # for the log file alone (an error the CLI prints itself)
            return False
        if record.name == PROGRESS or record.name.startswith(PROGRESS + "."):
            return progress_lines
        return record.levelno >= level

    return keep


@contextlib.contextmanager
def configured(verbose: int = 0, quiet: bool = False, log_file: str | None = None) -> Iterator[None]:
    """Handlers on the ``nq_onnx`` logger for the ``with`` body: stderr by verbosity (progress lines where stderr is
    not a terminal and not ``quiet``), and ``log_file`` (appended) with every INFO line, DEBUG ones too with
    ``-vv``; the logger's earlier state is restored after."""
    logger = logging.getLogger(LOGGER)
    level = console_level(verbose, quiet)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(_ConsoleFormatter())
    console.addFilter(_console_filter(level, not quiet and not _is_terminal()))
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
        handler.setFormatter(logging.Formatter(FILE_FORMAT))
        handlers.append(handler)
    saved = logger.level, logger.propagate
    logger.setLevel(min(logging.INFO, level) if verbose < 2 else logging.DEBUG)
    logger.propagate = False
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def progress_line(desc: str | None, done: int, total: int | None, elapsed: float) -> str:
    """``search (noisyquant): 12/48, 40 s, ~2 min left``."""
    line = f"{desc or 'working'}: {done}" + (f"/{total}" if total else "") + f", {duration(elapsed)}"
    if total and done:
        line += f", ~{duration(elapsed / done * (total - done))} left"
    return line


def log_progress(iterable: Iterable, total: int | None = None, desc: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> Iterator:
    """The items of ``iterable``, with a progress line on ``nq_onnx.progress`` whenever ``INTERVAL`` seconds have
    passed since the last one, after the item that was being worked on."""
    log = logging.getLogger(PROGRESS)
    start = last = clock()
    for done, item in enumerate(iterable, 1):
        yield item
        now = clock()
        if now - last >= INTERVAL:
            last = now
            log.info(progress_line(desc, done, total, now - start))


def progress(quiet: bool = False) -> Callable:
    """The progress callable ``progress(iterable, total=None, desc=None)`` the library's long loops take: log lines
    (:func:`log_progress`) always, and a tqdm bar over them where stderr is a terminal and not ``quiet``."""
    bars = not quiet and _is_terminal()

    def wrap(iterable: Iterable, total: int | None = None, desc: str | None = None) -> Iterable:
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        items = log_progress(iterable, total, desc)
        if not bars:
            return items
        from tqdm import tqdm

        return tqdm(items, total=total, desc=desc, leave=False, file=sys.stderr, mininterval=0.5)

    return wrap
