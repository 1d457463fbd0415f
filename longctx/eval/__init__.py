"""Evaluation of trained runs: perplexity vs length, pass key, needle in a haystack, RULER-style tasks and LongBench /
L-Eval files (`suite.TASKS`), with reports and plots."""

from longctx.eval.report import write_report
from longctx.eval.suite import evaluate

__all__ = ["evaluate", "write_report"]
