"""A training run's history on disk: ``history.csv`` and ``learning_curve.png`` in its work directory.

Written by :func:`morphomol.train.loop.fit` on rank 0: the CSV after every epoch (so a running job can
be watched: ``column -s, -t < runs/<setting>/fold0/history.csv``), the PNG when the fit ends or is
preempted (not in hidden scratch work directories, e.g. the slides study's ``.train``). One row per
finished epoch (1-based ``epoch``): ``loss`` (training, per unit), the validation
score (``val_mse`` / ``val_infonce`` ...) and its extras (e.g. ``val_pearson``; empty where an epoch was
not validated), ``tiles``, ``tiles_per_second``, ``lr_head``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from morphomol.util.logs import get_logger

log = get_logger("train")


HISTORY_CSV = "history.csv"
LEARNING_CURVE = "learning_curve.png"


def run_title(work_dir: str | Path) -> str:
    """What a run directory is, for its figure: ``demo_spots · spots · seed_head · fold 0 · seed 40`` from
    ``results/{cohort}/{study}/runs/{setting}/fold{k}[/seed{s}]`` (workflow/paths.py); other directories: their
    last three path components."""
    parts = Path(work_dir).parts
    if "runs" in parts[:-1]:
        i = len(parts) - 1 - parts[::-1].index("runs")
        head = list(parts[max(0, i - 2):i])  # cohort, study
        rest = [f"{m.group(1)} {m.group(2)}" if (m := re.fullmatch(r"(fold|seed)(\d+)", x)) else x
                for x in parts[i + 1:]]
        return " · ".join(head + rest)
    return " · ".join(parts[-3:])


def write_history(work_dir: str | Path, history: Sequence[dict[str, Any]], *, curve: bool = False,
                  best_epoch: int | None = None, title: str | None = None) -> None:
    """``history.csv`` (one row per finished epoch, epochs 1-based) and, with ``curve``, the learning-curve
    PNG (training loss and every validation score per epoch; the best epoch marked; titled ``title``, by
    default :func:`run_title` of ``work_dir``)."""
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
                                else best_epoch + 1, title=title if title is not None else run_title(out))
        except Exception as exc:  # a figure must never fail a training run
            log.warning("learning curve not drawn: %s", exc)


def plot_learning_curve(df: Any, out: Path, *, best_epoch: int | None = None, title: str = "") -> None:
    """Loss (left axis) and validation scores (right axis) per epoch of a ``history.csv`` table, as a PNG."""
    import matplotlib.pyplot as plt

    from morphomol.util.atomic import atomic_path

    fig = learning_curve_figure(df, best_epoch=best_epoch, title=title)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def learning_curve_figure(df: Any, *, best_epoch: int | None = None, title: str = "") -> Any:
    """The learning-curve figure: ``title`` (cohort · study · setting · fold), whole-epoch ticks, the training
    loss per epoch, every validation score on a second axis, the best epoch marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(df["epoch"], df["loss"], "o-", color="#1f77b4", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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
        ax.axvline(best_epoch, color="grey", lw=0.8, ls=":", label="_best epoch")
    sub = f"best epoch {best_epoch}" if best_epoch is not None else ""
    ax.set_title("\n".join(t for t in (title, sub) if t), fontsize=8)
    fig.tight_layout()
    return fig
