"""The Min-MAE baseline of Table A.1: per target gene, copy the core gene whose log1p tile counts
have the lowest mean absolute error on the fit tiles."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from morphomol.data.runs import write_metrics, write_predictions
from morphomol.eval.metrics import regression_report
from morphomol.studies.fusion.data import FoldData
from morphomol.train.checkpoint import RunOutputs, as_outputs
from morphomol.train.sources import gather
from morphomol.util.jsonio import write_json
from morphomol.util.logs import get_logger

log = get_logger("fusion.baselines")


def min_mae_select(x: np.ndarray, y: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """For each target column of ``y`` the column of ``x`` with the lowest MAE (ties: lowest index).

    Both in log1p space, (N, G) and (N, T). Returns ``(best (T,), mae (T, G))``.
    """
    x_t = torch.from_numpy(np.asarray(x, dtype=np.float64))
    y_t = torch.from_numpy(np.asarray(y, dtype=np.float64))
    total = torch.zeros(y_t.shape[1], x_t.shape[1], dtype=torch.float64)
    for i in range(0, x_t.shape[0], chunk):
        total += torch.cdist(y_t[i:i + chunk].T.contiguous(), x_t[i:i + chunk].T.contiguous(), p=1)
    mae = (total / max(1, x_t.shape[0])).numpy()
    return mae.argmin(axis=1), mae


def run_min_mae(data: FoldData, out: str | Path | RunOutputs, *, fold: int = 0, setting_name: str = "min_mae") -> dict[str, Any]:
    """Min-MAE baseline: copy, per target gene, the fit-set MAE-optimal core gene (log1p tile counts)."""
    outs = as_outputs(out)
    t0 = time.perf_counter()
    fit_arr = gather(data.fit, ["tile", "target"])
    best, mae = min_mae_select(np.log1p(fit_arr["tile"]), fit_arr["target"])
    test_arr = gather(data.test, ["tile", "target"])
    y_hat = np.log1p(test_arr["tile"])[:, best]
    y = test_arr["target"]
    seconds = time.perf_counter() - t0
    mapping = {t: data.core_genes[j] for t, j in zip(data.addon_genes, best)}
    report = regression_report(y, y_hat, data.addon_genes)
    metrics = {"setting": setting_name, "fold": int(fold), "kind": "regression", "status": "ok",
               "n_fit": len(data.fit), "n_val": len(data.val), "n_test": len(data.test), **report,
               "best_epoch": None, "epochs_run": 0, "train_seconds": seconds,
               "tiles_per_second": (len(data.fit) + len(data.test)) / max(seconds, 1e-9),
               "pretrained": False, "paper_row": "min-mae", "source_gene": mapping,
               "fit_mae": {t: float(mae[i, j]) for i, (t, j) in enumerate(zip(data.addon_genes, best))}}
    if outs.predictions is not None:
        write_predictions(outs.predictions, test_arr["tile_id"], data.addon_genes, y, y_hat)
    if outs.checkpoint_meta is not None:
        write_json(outs.checkpoint_meta, {"setting": setting_name, "fold": int(fold), "kind": "min_mae",
                                                     "source_gene": mapping, "core_genes": data.core_genes,
                                                     "addon_genes": data.addon_genes})
    write_metrics(outs.metrics, metrics)
    log.info("min_mae fold %d: test pearson %.4f mse %.4f", fold, metrics["mean"]["pearson"], metrics["mean"]["mse"])
    return metrics
