"""Figures of the cells study (PNG, matplotlib Agg; torch-free): confusion matrices, per-class F1, per-task
loss curves with the task-ratio schedule."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from morphomol.report.figures import save_figure  # noqa: E402
from morphomol.studies.cells.config import TASKS  # noqa: E402
from morphomol.studies.cells.tables import METHODS  # noqa: E402
from morphomol.util.atomic import atomic_path  # noqa: E402
from morphomol.util.jsonio import read_json  # noqa: E402

COLORS = dict(zip(TASKS, ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"), strict=True))


def plot_confusion(conf: pd.DataFrame, out: str | Path, methods: Sequence[str] = ("llm:score", "logreg")) -> Path:
    """Row-normalised confusion matrices (pooled test cells) side by side."""
    methods = [m for m in methods if m in set(conf["method"])]
    fig, axes = plt.subplots(1, max(1, len(methods)), figsize=(6.2 * max(1, len(methods)), 5.6), squeeze=False)
    for ax, m in zip(axes[0], methods, strict=False):
        c = conf[conf["method"] == m].pivot(index="true", columns="predicted", values="count").fillna(0)
        c = c.reindex(columns=list(c.index) + [x for x in c.columns if x not in c.index], fill_value=0)
        frac = c.to_numpy(float) / np.maximum(c.to_numpy(float).sum(1, keepdims=True), 1)
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(c.shape[1]), c.columns, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(c.shape[0]), c.index, fontsize=7)
        for i in range(frac.shape[0]):
            for j in range(frac.shape[1]):
                if c.iat[i, j]:
                    ax.text(j, i, int(c.iat[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if frac[i, j] > 0.6 else "black")
        acc = np.trace(c.to_numpy(float)[:, : c.shape[0]]) / max(c.to_numpy(float).sum(), 1)
        ax.set_title(f"{METHODS.get(m, m)}\n(pooled test cells, accuracy {acc:.3f})", fontsize=9)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    return save_figure(fig, out)


def plot_per_class(f1: pd.DataFrame, out: str | Path,
                   methods: Sequence[str] = ("llm:score", "llm:generate", "logreg", "knn", "untuned:score")) -> Path:
    """Grouped bars: per-class F1 of each method (pooled test cells)."""
    methods = [m for m in methods if m in set(f1["method"])]
    labels = sorted(set(f1["label"]))
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(labels)), 4.2))
    w = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        d = f1[f1["method"] == m].set_index("label").reindex(labels)
        ax.bar(np.arange(len(labels)) + (i - (len(methods) - 1) / 2) * w, d["f1"].to_numpy(float), w,
               label=METHODS.get(m, m))
    ax.set_xticks(range(len(labels)), labels, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("F1 (test cells)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Per-class F1, gene -> cell type", fontsize=10)
    return save_figure(fig, out)


def plot_loss_curves(logs: Sequence[pd.DataFrame], vals: Sequence[Sequence[dict]], out: str | Path,
                     window: int = 10) -> Path:
    """Per-task training loss (rolling mean, one line per fold), validation loss (markers) and the
    schedule's task weights over the steps."""
    fig, (ax, axw) = plt.subplots(2, 1, figsize=(8, 6.4), sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    for k, (lg, val) in enumerate(zip(logs, vals, strict=True)):
        for t in TASKS:
            col = f"loss_{t}"
            if col in lg and lg[col].notna().any():
                y = lg[col].rolling(window, min_periods=1).mean()
                ax.plot(lg["step"], y, color=COLORS[t], alpha=0.8, lw=1, label=t if k == 0 else None,
                        ls=("-", "--", ":", "-.")[k % 4])
            vs = [(r["step"], r[f"val_loss_{t}"]) for r in val if f"val_loss_{t}" in r]
            if vs:
                ax.plot(*zip(*vs), "o", color=COLORS[t], ms=4, mfc="white")
        if k == 0:
            for t in TASKS:
                if f"weight_{t}" in lg:
                    axw.plot(lg["step"], lg[f"weight_{t}"], color=COLORS[t])
    ax.set_ylabel("loss per response token")
    ax.set_title("Per-task training loss (lines: folds, rolling mean) and validation loss (circles)", fontsize=9)
    ax.legend(fontsize=7)
    axw.set_ylabel("task weight")
    axw.set_xlabel("step")
    return save_figure(fig, out)


def make_plots(*, per_class: str | Path, confusion: str | Path, summary: str | Path, train_logs: Sequence[str | Path],
               train_metrics: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """Rule entry (``cells_plots``): ``confusion.png``, ``per_class_f1.png``, ``loss_curves.png`` in ``out_dir``."""
    read_json(summary, "cells summary")
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        paths = [plot_confusion(pd.read_csv(confusion), tmp / "confusion.png"),
                 plot_per_class(pd.read_csv(per_class), tmp / "per_class_f1.png"),
                 plot_loss_curves([pd.read_csv(p) for p in train_logs],
                                  [read_json(p, "train metrics").get("validation", []) for p in train_metrics],
                                  tmp / "loss_curves.png")]
    return [Path(out_dir) / p.name for p in paths]
