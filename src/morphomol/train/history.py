"""A training run's history on disk: ``history.csv`` and ``learning_curve.png`` in its work directory.

Written by :func:`morphomol.train.loop.fit` on rank 0: the CSV after every epoch (so a running job can
be watched: ``column -s, -t < runs/<setting>/fold0/history.csv``), the PNG when the fit ends or is
preempted (not in hidden scratch work directories, e.g. the slides study's ``.train``). One row per
finished epoch (1-based ``epoch``): ``loss`` (training, per unit), the validation
score (``val_mse`` / ``val_infonce`` ...) and its extras (e.g. ``val_pearson``; empty where an epoch was
not validated), ``tiles``, ``tiles_per_second``, ``lr_head``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from morphomol.util.logs import get_logger

log = get_logger("train")


HISTORY_CSV = "history.csv"
LEARNING_CURVE = "learning_curve.png"


def write_history(work_dir: str | Path, history: Sequence[dict[str, Any]], *, curve: bool = False,
                  best_epoch: int | None = None) -> None:
    """``history.csv`` (one row per finished epoch, epochs 1-based) and, with ``curve``, the learning-curve
    PNG (training loss and every validation score per epoch; the best epoch marked)."""
    import pandas as pd

    from morphomol.util.atomic import atomic_path

    if not history or Path(work_dir).name.startswith("."):  # a hidden scratch directory keeps no history
        return
    df = pd.DataFrame([{k: v for k, v in r.items() if np.isscalar(v) or v is None} for r in history])
    df["epoch"] = df["epoch"].astype(int) + 1
    out = Path(work_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / HISTORY_CSV) as tmp:
        df.to_csv(tmp, index=False)
    if curve:
        try:
            plot_learning_curve(df, out / LEARNING_CURVE, best_epoch=None if best_epoch is None or best_epoch < 0
                                else best_epoch + 1)
        except Exception as exc:  # a figure must never fail a training run
            log.warning("learning curve not drawn: %s", exc)


def plot_learning_curve(df: Any, out: Path, *, best_epoch: int | None = None) -> None:
    """Loss (left axis) and validation scores (right axis) per epoch of a ``history.csv`` table."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from morphomol.util.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(df["epoch"], df["loss"], "o-", color="#1f77b4", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    skip = {"epoch", "loss", "tiles", "tiles_per_second", "lr_head", "compile_seconds"}
    vals = [c for c in df.columns if c not in skip and df[c].notna().any() and np.issubdtype(df[c].dtype, np.number)]
    if vals:
        ax2 = ax.twinx()
        for i, c in enumerate(vals):
            d = df[df[c].notna()]
            ax2.plot(d["epoch"], d[c], "s--", color=f"C{i + 1}", label=c)
        ax2.set_ylabel("validation")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
    if best_epoch is not None:
        ax.axvline(best_epoch, color="grey", lw=0.8, ls=":")
        ax.set_title(f"best epoch {best_epoch}", fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
