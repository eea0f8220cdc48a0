"""Evaluation: the one implementation of the benchmark metrics and the statistics across folds.

* :mod:`.metrics`  per-gene Pearson / Spearman / MSE / MAE, fold summaries, CLIP recall@k
* :mod:`.stats`    Holm correction, paired t-tests across folds, streaming correlation matrices

Torch-free and light (numpy / pandas; scipy only inside the t-tests).
"""

from morphomol.eval.metrics import (
    HIGHER_IS_BETTER,
    METRIC_LABELS,
    METRICS,
    column_pearson,
    column_ranks,
    pearson,
    per_gene_metrics,
    recall_at_k,
    regression_report,
    spearman,
    summarize,
)
from morphomol.eval.stats import TTEST_COLUMNS, CorrelationAccumulator, holm, paired_ttests

__all__ = [
    "HIGHER_IS_BETTER", "METRICS", "METRIC_LABELS", "TTEST_COLUMNS", "CorrelationAccumulator", "column_pearson",
    "column_ranks", "holm", "paired_ttests", "pearson", "per_gene_metrics", "recall_at_k", "regression_report",
    "spearman", "summarize",
]
