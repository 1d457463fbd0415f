"""Evaluation of trained runs: perplexity vs length (later issues add retrieval tasks), reports and plots."""

from longctx.eval.report import write_report
from longctx.eval.suite import evaluate

__all__ = ["evaluate", "write_report"]
