"""The ``nq-onnx`` command line, generated from the option declarations: the parser and ``main`` (``main.py``), the
subcommands (``commands.py``), options and presets as flags (``options.py``), configuration files
(``config_file.py``) and logging (``log.py``)."""

from nq_onnx.cli.main import EXIT_CODES, build_parser, main

__all__ = ["EXIT_CODES", "build_parser", "main"]
