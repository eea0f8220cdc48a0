"""Generic figure helpers (PNG, matplotlib Agg): saving, predicted-vs-measured panels, spatial
maps over an H&E thumbnail, correlation heat maps. Every function takes plain DataFrames / arrays
and an output path; the study's own figures (:mod:`morphomol.studies.fusion.plots`) build on them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.collections import PatchCollection  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from morphomol.errors import InputError  # noqa: E402
from morphomol.eval.metrics import pearson, spearman  # noqa: E402
from morphomol.util.atomic import atomic_path  # noqa: E402
from morphomol.util.logs import get_logger  # noqa: E402

log = get_logger("figures")

DPI = 110


def save_figure(fig: plt.Figure, out: str | Path) -> Path:
    """Write ``fig`` as PNG atomically and close it."""
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return out


def horizontal_boxplot(ax: plt.Axes, data: list[np.ndarray], **kw: object) -> dict:
    """``ax.boxplot`` drawn horizontally on every matplotlib version (``orientation`` since 3.10)."""
    mpl_version = tuple(int(x) for x in matplotlib.__version__.split(".")[:2] if x.isdigit())
    orient = {"orientation": "horizontal"} if mpl_version >= (3, 10) else {"vert": False}
    return ax.boxplot(data, **kw, **orient)


# --------------------------------------------------------------------------------------------
# predicted vs measured
# --------------------------------------------------------------------------------------------


def select_genes(per_gene_metric: pd.Series) -> dict[str, str]:
    """Best, median and worst gene (index = gene) of a per-gene metric (NaNs ignored)."""
    s = per_gene_metric.dropna().sort_values(kind="mergesort")
    if s.empty:
        raise InputError("no per-gene metric to choose genes from")
    return {"best": str(s.index[-1]), "median": str(s.index[(len(s) - 1) // 2]), "worst": str(s.index[0])}


def plot_pred_vs_measured(predictions: pd.DataFrame, genes: Mapping[str, str], out: str | Path, *,
                          title: str | None = None, max_points: int = 20000, seed: int = 0) -> Path:
    """One panel per (label, gene): y_hat vs y (predictions: tile_id, gene, y, y_hat), titled with
    the gene's Pearson and Spearman over all points (:mod:`morphomol.eval.metrics`)."""
    fig, axes = plt.subplots(1, len(genes), figsize=(3.6 * len(genes), 3.6), squeeze=False)
    rng = np.random.default_rng(seed)
    for ax, (label, gene) in zip(axes[0], genes.items()):
        d = predictions[predictions["gene"] == gene]
        if d.empty:
            ax.set_title(f"{label}: {gene} (no predictions)", fontsize=9)
            continue
        y, yh = d["y"].to_numpy(float), d["y_hat"].to_numpy(float)
        r = pearson(y, yh) if len(y) > 2 else math.nan
        rho = spearman(y, yh) if len(y) > 2 else math.nan
        idx = rng.choice(len(y), size=min(len(y), max_points), replace=False)
        ax.scatter(y[idx], yh[idx], s=3, alpha=0.3, color="#1f77b4", rasterized=True)
        lo, hi = float(min(y.min(), yh.min())), float(max(y.max(), yh.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_title(f"{label}: {gene}\nPearson {r:.3f}, Spearman {rho:.3f}", fontsize=9)
        ax.set_xlabel("measured log1p")
        ax.set_ylabel("predicted log1p")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)


# --------------------------------------------------------------------------------------------
# spatial maps
# --------------------------------------------------------------------------------------------


def cell_size(tiles: pd.DataFrame) -> float:
    """Side of the drawn square: the tile stride (smallest positive x/y spacing), ≤ the tile size."""
    size = float(np.median(tiles["size_px"])) if "size_px" in tiles and len(tiles) else 1.0
    steps = []
    for c in ("x_px", "y_px"):
        u = np.unique(tiles[c].to_numpy(float))
        d = np.diff(u)
        d = d[d > 0]
        if len(d):
            steps.append(float(d.min()))
    return min([size, *steps]) if steps else size


def plot_spatial_map(tiles: pd.DataFrame, measured: np.ndarray, predicted: np.ndarray, out: str | Path, *,
                     gene: str, sample: str = "", background: np.ndarray | None = None,
                     downsample: float = 1.0) -> Path:
    """Measured vs predicted expression per tile (tiles: x_px, y_px, size_px in level-0 H&E px),
    drawn as stride-sized squares at the tile centres, over an optional H&E thumbnail whose pixel
    = ``downsample`` level-0 px. NaN values are not drawn."""
    measured = np.asarray(measured, float)
    predicted = np.asarray(predicted, float)
    if len(measured) != len(tiles) or len(predicted) != len(tiles):
        raise InputError("measured/predicted length differs from the number of tiles", field="tiles")
    cell = cell_size(tiles)
    size = tiles["size_px"].to_numpy(float) if "size_px" in tiles else np.full(len(tiles), cell)
    cx = (tiles["x_px"].to_numpy(float) + size / 2) / downsample
    cy = (tiles["y_px"].to_numpy(float) + size / 2) / downsample
    half = cell / downsample / 2
    both = np.concatenate([measured, predicted])
    both = both[np.isfinite(both)]
    vmin, vmax = (np.percentile(both, [1, 99]) if len(both) else (0.0, 1.0))
    if vmax <= vmin:
        vmax = vmin + 1e-6
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    cmap = plt.get_cmap("viridis")
    norm = matplotlib.colors.Normalize(vmin=vmin, vmax=vmax)
    for ax, values, label in zip(axes, (measured, predicted), ("measured", "predicted")):
        if background is not None:
            ax.imshow(background, origin="upper")
        keep = np.isfinite(values)
        rects = [Rectangle((x - half, y - half), 2 * half, 2 * half) for x, y in zip(cx[keep], cy[keep])]
        pc = PatchCollection(rects, cmap=cmap, norm=norm, alpha=0.75 if background is not None else 1.0,
                             linewidths=0)
        pc.set_array(values[keep])
        ax.add_collection(pc)
        if background is None:
            if len(cx):
                ax.set_xlim(cx.min() - 2 * half, cx.max() + 2 * half)
                ax.set_ylim(cy.max() + 2 * half, cy.min() - 2 * half)
        ax.set_aspect("equal")
        ax.set_title(f"{sample} {gene} {label}".strip(), fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), shrink=0.8,
                 label=f"{gene} log1p counts")
    return save_figure(fig, out)


def load_thumbnail(he_path: str | Path | None, mpp: float | None, max_size: int = 1024) -> tuple[np.ndarray | None, float]:
    """(RGB thumbnail, level-0 px per thumbnail px) via ``morphomol.io.he.open_slide``;
    (None, 1.0) when the slide cannot be read (the map is then drawn without background)."""
    if not he_path:
        return None, 1.0
    try:
        from morphomol.io.he import open_slide

        mpp_arg = None if mpp is None or (isinstance(mpp, float) and math.isnan(mpp)) else float(mpp)
        slide = open_slide(he_path, mpp_arg)
        res = slide.thumbnail(max_size)
        if isinstance(res, tuple):
            img, ds = res
        else:  # an image object carrying .downsample
            img, ds = np.asarray(res), float(getattr(res, "downsample", 1.0))
        img = np.asarray(img)
        if img.ndim != 3 or img.shape[2] < 3:
            raise ValueError(f"thumbnail has shape {img.shape}")
        return img[..., :3], float(ds)
    except Exception as exc:  # degrade gracefully: the map is still useful without the H&E
        log.warning("no H&E background for %s: %s", he_path, exc)
        return None, 1.0


# --------------------------------------------------------------------------------------------
# heat maps
# --------------------------------------------------------------------------------------------


def cluster_order(m: np.ndarray, axis: int) -> np.ndarray:
    """Leaf order of an average-linkage clustering of the rows (axis 0) or columns (axis 1)."""
    from scipy.cluster.hierarchy import leaves_list, linkage

    x = np.nan_to_num(m if axis == 0 else m.T)
    if x.shape[0] < 3:
        return np.arange(x.shape[0])
    return leaves_list(linkage(x, method="average", metric="euclidean"))


def plot_correlation_heatmap(corr: pd.DataFrame, out: str | Path, *, cluster: bool = True, max_labels: int = 60,
                             row_label: str = "source (core) genes", col_label: str = "target (add-on) genes",
                             value_label: str = "Pearson r (log1p tile counts)") -> Path:
    """Heat map of a correlation matrix (rows × cols, clustered), colour scale -1..1; tick labels
    when there are at most ``max_labels`` rows / columns."""
    m = corr.to_numpy(float)
    ri = cluster_order(m, 0) if cluster else np.arange(m.shape[0])
    ci = cluster_order(m, 1) if cluster else np.arange(m.shape[1])
    m = m[np.ix_(ri, ci)]
    fig, ax = plt.subplots(figsize=(min(4 + 0.12 * m.shape[1], 16), min(3 + 0.08 * m.shape[0], 18)))
    im = ax.imshow(m, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    if m.shape[0] <= max_labels:
        ax.set_yticks(range(m.shape[0]), corr.index[ri], fontsize=6)
    else:
        ax.set_yticks([])
    if m.shape[1] <= max_labels:
        ax.set_xticks(range(m.shape[1]), corr.columns[ci], fontsize=6, rotation=90)
    else:
        ax.set_xticks([])
    ax.set_ylabel(f"{row_label}, n={m.shape[0]}")
    ax.set_xlabel(f"{col_label}, n={m.shape[1]}")
    fig.colorbar(im, ax=ax, label=value_label, shrink=0.7)
    return save_figure(fig, out)
