"""What a conversion tells its user: the summary ``convert`` prints (``summary.py``) and the HTML report
(``page.py``, with its figures in ``figures.py`` and its verdict and settings sections in ``sections.py``).

``build_report`` is loaded on first use, so that the pipeline's import of the summary does not load the report."""

__all__ = ["build_report"]


def __getattr__(name: str):
    if name == "build_report":
        from nq_onnx.report.page import build_report

        return build_report
    raise AttributeError(f"module 'nq_onnx.report' has no attribute {name!r}")
