"""``python -m nq_onnx.cli``: the ``nq-onnx`` command."""

import sys

from nq_onnx.cli.main import main

sys.exit(main())
