"""Figures of the slides study (PNG through :func:`morphomol.report.figures.save_figure`).

* ``spectrum.png``   per gene set, ordered by soft-kNN R² (mean ± sd over folds): grounded programs,
                     other sets and the size-matched null sets in three colours; the direct-prompting
                     R² as dots; the permuted-pairs control as crosses.
* ``retrieval.png``  recall@k slide->RNA of the trained, untrained and permuted-pairs projections and
                     chance, per setting.
* ``transfer.png``   per target cohort: recall@k and grounded R² against the fraction of target
                     patients used (zero-shot at 0), fine-tuned vs reference-only, and chance.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

COLOURS = {"grounded": "#d95f02", "other": "#7570b3", "null": "#999999"}


def plot_spectrum(gs: pd.DataFrame, out: str | Path, *, title: str) -> Path:
    import matplotlib.pyplot as plt

    from morphomol.report.figures import save_figure

    df = gs.sort_values("knn_trained_r2_mean", ascending=False)
    group = np.where(df["null"], "null", np.where(df["grounded"], "grounded", "other"))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(df) + 2), 4.2))
    x = np.arange(len(df))
    ax.bar(x, df["knn_trained_r2_mean"].to_numpy(), yerr=np.nan_to_num(df["knn_trained_r2_sd"].to_numpy()),
           color=[COLOURS[g] for g in group], error_kw={"lw": 0.6}, label="soft-kNN")
    if "prompt_trained_r2_mean" in df:
        ax.scatter(x, df["prompt_trained_r2_mean"], s=10, color="black", zorder=3, label="direct prompt")
    if "knn_permuted_r2_mean" in df:
        ax.scatter(x, df["knn_permuted_r2_mean"], s=10, marker="x", color="#1b9e77", zorder=3, label="permuted pairs")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(x)
    ax.set_xticklabels([s.replace("HALLMARK_", "") for s in df["gene_set"]], rotation=90, fontsize=6)
    ax.set_ylabel("R² on held-out slides")
    r2 = df["knn_trained_r2_mean"].to_numpy(float)
    lo = float(np.nanmin(r2)) if np.isfinite(r2).any() else 0.0  # all n/a: too few test slides per fold
    ax.set_ylim(max(-1.0, min(-0.2, lo - 0.1)), 1.0)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOURS.values()]
    leg = ax.legend(handles, list(COLOURS), loc="upper right", fontsize=7, title="sets", title_fontsize=7)
    ax.add_artist(leg)
    ax.legend(loc="upper center", fontsize=7)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, out)


def plot_retrieval(ret: pd.DataFrame, ks: Sequence[int], out: str | Path) -> Path:
    import matplotlib.pyplot as plt

    from morphomol.report.figures import save_figure

    settings = list(dict.fromkeys(ret["setting"]))
    fig, axes = plt.subplots(1, len(settings), figsize=(3.8 * len(settings), 3.2), squeeze=False, constrained_layout=True)
    for ax, s in zip(axes[0], settings, strict=True):
        sub = ret[ret["setting"] == s].set_index("model")
        for model, style in (("trained", "-o"), ("untrained", "-s"), ("permuted", "-x"), ("chance", "--")):
            if model in sub.index:
                y = [sub.at[model, f"slide_to_rna_recall@{k}_mean"] for k in ks]
                ax.plot(list(ks), y, style, label=model, ms=4)
        ax.set_xlabel("k")
        ax.set_ylabel("recall@k slide→RNA")
        ax.set_ylim(0, 1.02)
        ax.set_title(s, fontsize=9)
        ax.legend(fontsize=7)
    return save_figure(fig, out)


def plot_transfer(tr: pd.DataFrame, ks: Sequence[int], out: str | Path) -> Path:
    import matplotlib.pyplot as plt

    from morphomol.report.figures import save_figure

    k = ks[-1]
    targets = list(dict.fromkeys(tr["target"]))
    fig, axes = plt.subplots(len(targets), 2, figsize=(8, 3.2 * len(targets)), squeeze=False, constrained_layout=True)
    for row, t in zip(axes, targets, strict=True):
        sub = tr[tr["target"] == t]
        zero = sub[sub["mode"] == "zero_shot"]
        for ax, col, label in ((row[0], f"slide_to_rna:recall@{k}", f"recall@{k} slide→RNA"),
                               (row[1], "mean_r2_grounded", "R² grounded sets")):
            for mode, style in (("finetune", "-o"), ("reference_only", "--s")):
                m = pd.concat([zero, sub[sub["mode"] == mode]])
                ax.errorbar(100 * m["fraction"].to_numpy(float), m[f"{col}_mean"].to_numpy(float),
                            yerr=np.nan_to_num(m[f"{col}_sd"].to_numpy(float)), fmt=style, ms=4, capsize=2, label=mode)
            if col.startswith("slide_to_rna"):
                ax.plot(100 * sub["fraction"].to_numpy(float), sub[f"chance:recall@{k}_mean"].to_numpy(float), ":",
                        color="grey", label="chance")
            ax.set_xlabel("% of target patients used")
            ax.set_ylabel(label)
            ax.set_title(f"target {t}", fontsize=9)
            ax.legend(fontsize=7)
    return save_figure(fig, out)
