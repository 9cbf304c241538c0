"""Long-context evaluation: metrics, tasks, the runner, tables and plots (CLI: python -m eijax.eval)."""

from eijax.eval.metrics import lcs_length, metric_for_dataset, qa_f1, rouge_l

__all__ = ["lcs_length", "metric_for_dataset", "qa_f1", "rouge_l"]
