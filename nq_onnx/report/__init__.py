"""What a conversion tells its user: the summary ``convert`` prints (``summary.py``) and the HTML report
(``page.py``, with its figures in ``figures.py`` and its verdict and settings sections in ``sections.py``)."""

from nq_onnx.report.page import build_report

__all__ = ["build_report"]
