"""Long-context evaluation: metrics, tasks, the runner, tables and plots (CLI: python -m eijax.eval);
where the beyond-window loss gap lies (python -m eijax.eval.ppl_gap)."""

from eijax.eval.metrics import lcs_length, metric_for_dataset, qa_f1, rouge_l

__all__ = ["lcs_length", "metric_for_dataset", "qa_f1", "rouge_l"]
