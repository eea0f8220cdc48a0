"""Classification metrics of the cells study (torch-free): accuracy, macro-F1, balanced accuracy, per-class
F1 and the confusion matrix. An unparsed free-text answer (no label named) is the prediction
:data:`UNPARSED` and counts as wrong."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from morphomol.studies.cells.config import IMAGE_TASKS

UNPARSED = "(unparsed)"
#: partitions the models are evaluated on
PARTITIONS = ("val", "test")


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str]) -> dict[str, Any]:
    """``n, accuracy, macro_f1, balanced_accuracy, unparsed`` (macro over the classes present in ``y_true``)."""
    from sklearn.metrics import f1_score, recall_score

    yt = np.asarray(y_true, dtype=object).astype(str)
    yp = np.asarray(y_pred, dtype=object).astype(str)
    n = len(yt)
    if n == 0:
        return {"n": 0, "accuracy": None, "macro_f1": None, "balanced_accuracy": None, "unparsed": None}
    present = sorted(set(yt))
    return {"n": int(n), "accuracy": float((yt == yp).mean()),
            "macro_f1": float(f1_score(yt, yp, labels=present, average="macro", zero_division=0)),
            "balanced_accuracy": float(recall_score(yt, yp, labels=present, average="macro", zero_division=0)),
            "unparsed": float((yp == UNPARSED).mean())}


def per_class_f1(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    from sklearn.metrics import f1_score

    yt = np.asarray(y_true, dtype=object).astype(str)
    yp = np.asarray(y_pred, dtype=object).astype(str)
    scores = f1_score(yt, yp, labels=list(labels), average=None, zero_division=0)
    return {lab: float(s) for lab, s in zip(labels, scores, strict=True)}


def confusion(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> pd.DataFrame:
    """Counts: rows = true labels, columns = predicted labels (+ :data:`UNPARSED` when it occurs)."""
    cols = list(labels) + ([UNPARSED] if UNPARSED in set(map(str, y_pred)) else [])
    other = sorted(set(map(str, y_pred)) - set(cols))
    cols += other
    m = pd.DataFrame(0, index=pd.Index(list(labels), name="true"), columns=pd.Index(cols, name="predicted"))
    for t, p in zip(map(str, y_true), map(str, y_pred), strict=True):
        if t in m.index:
            m.at[t, p] += 1
    return m


def summarise(per_fold: Sequence[float | None]) -> tuple[float, float, int]:
    """(mean, sd (ddof 1), n) over the folds with a value."""
    v = np.asarray([x for x in per_fold if x is not None and np.isfinite(x)], float)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), int(len(v))


def results_table(preds: pd.DataFrame) -> list[dict[str, Any]]:
    """Metrics per (partition, task, mode), plus the gene -> type task restricted to cells with a patch
    (``subset: image_cells``, the modality matrix's genes-only cell)."""
    out = []
    for (part, task, mode), g in preds.groupby(["partition", "task", "mode"], sort=True):
        out.append({"partition": part, "task": task, "mode": mode, "subset": "all",
                    **classification_metrics(g["label"].tolist(), g["pred"].tolist())})
        if task not in IMAGE_TASKS and g["has_image"].any():
            gi = g[g["has_image"]]
            out.append({"partition": part, "task": task, "mode": mode, "subset": "image_cells",
                        **classification_metrics(gi["label"].tolist(), gi["pred"].tolist())})
    return out
