"""Benchmark figures (PNG, matplotlib Agg).

Every ``plot_*`` function takes plain DataFrames / arrays and an output path, so it can be tested
on synthetic data; :func:`make_plots` reads one cohort's result directory and draws them all:

* ``setting_summary.png``   mean Spearman ± std per setting (Figure 2A style)
* ``per_gene_spearman.png`` per-gene Spearman distribution per setting (box plots)
* ``pred_vs_measured.png``  predicted vs measured for the best / median / worst gene (Figure A.3)
* ``spatial_{sample}.png``  measured and predicted expression of one gene over the H&E thumbnail
* ``source_target_corr.png`` (+ ``.csv``) core × add-on Pearson correlation (Figure A.1)
* ``predictability_vs_redundancy.png``  per-target Spearman vs avg_src_corr (Figure A.2)
* ``clip_recall.png``       CLIP recall@1/@5 with the random baseline (Table A.2)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.collections import PatchCollection  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from morphomol.util.atomic import atomic_path  # noqa: E402
from morphomol.errors import InputError  # noqa: E402
from morphomol.util.logs import get_logger  # noqa: E402

log = get_logger("plots")

FAMILY_COLORS = {
    "early fusion": "#d62728",
    "late fusion": "#ff7f0e",
    "morph-only": "#1f77b4",
    "expr-only": "#2ca02c",
    "baseline (Min-MAE)": "#7f7f7f",
    "baseline (ridge)": "#17becf",
    "CLIP": "#9467bd",
    "other": "#8c564b",
}
DPI = 110


def _save(fig: plt.Figure, out: str | Path) -> Path:
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return out


def _color(family: str | None) -> str:
    return FAMILY_COLORS.get(family or "other", FAMILY_COLORS["other"])


# --------------------------------------------------------------------------------------------
# per-setting summaries
# --------------------------------------------------------------------------------------------


def plot_setting_summary(table_a1: pd.DataFrame, out: str | Path, metric: str = "spearman") -> Path:
    """Horizontal bars of ``{metric}_mean`` ± ``{metric}_std`` per setting, coloured by family."""
    df = table_a1.dropna(subset=[f"{metric}_mean"]).sort_values(f"{metric}_mean")
    if df.empty:
        raise InputError("no setting has results", field=f"{metric}_mean")
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(df) + 1.2))
    colors = [_color(f) for f in df.get("family", pd.Series(["other"] * len(df)))]
    ax.barh(df["setting"].astype(str), df[f"{metric}_mean"], xerr=df[f"{metric}_std"].fillna(0),
            color=colors, ecolor="black", capsize=2)
    ax.set_xlabel(f"{metric.capitalize()} (mean ± std across folds)")
    fams = list(dict.fromkeys(df.get("family", pd.Series(["other"])).tolist()))
    ax.legend(handles=[Rectangle((0, 0), 1, 1, color=_color(f)) for f in fams], labels=fams, fontsize=7,
              loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, out)


def plot_per_gene_distribution(per_gene: pd.DataFrame, out: str | Path, *, metric: str = "spearman",
                               families: Mapping[str, str] | None = None) -> Path:
    """Box plot of per-gene ``{metric}_mean`` (long table: setting, gene, {metric}_mean) per setting,
    settings sorted by median."""
    col = f"{metric}_mean" if f"{metric}_mean" in per_gene else metric
    df = per_gene.dropna(subset=[col])
    if df.empty:
        raise InputError("no per-gene values", field=col)
    groups = {s: g[col].to_numpy(float) for s, g in df.groupby("setting", sort=False)}
    order = sorted(groups, key=lambda s: np.median(groups[s]))
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(order) + 1.2))
    mpl_version = tuple(int(x) for x in matplotlib.__version__.split(".")[:2] if x.isdigit())
    orient = {"orientation": "horizontal"} if mpl_version >= (3, 10) else {"vert": False}
    bp = ax.boxplot([groups[s] for s in order], patch_artist=True, widths=0.6, flierprops={"markersize": 2},
                    **orient)
    ax.set_yticks(range(1, len(order) + 1), order)
    for patch, s in zip(bp["boxes"], order):
        patch.set_facecolor(_color((families or {}).get(s)))
        patch.set_alpha(0.7)
    ax.set_xlabel(f"per-gene {metric.capitalize()} (mean across folds)")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, out)


def select_genes(per_gene_metric: pd.Series) -> dict[str, str]:
    """Best, median and worst gene (index = gene) of a per-gene metric (NaNs ignored)."""
    s = per_gene_metric.dropna().sort_values(kind="mergesort")
    if s.empty:
        raise InputError("no per-gene metric to choose genes from")
    return {"best": str(s.index[-1]), "median": str(s.index[(len(s) - 1) // 2]), "worst": str(s.index[0])}


def plot_pred_vs_measured(predictions: pd.DataFrame, genes: Mapping[str, str], out: str | Path, *,
                          title: str | None = None, max_points: int = 20000, seed: int = 0) -> Path:
    """One panel per (label, gene): y_hat vs y (predictions: tile_id, gene, y, y_hat)."""
    from scipy import stats

    fig, axes = plt.subplots(1, len(genes), figsize=(3.6 * len(genes), 3.6), squeeze=False)
    rng = np.random.default_rng(seed)
    for ax, (label, gene) in zip(axes[0], genes.items()):
        d = predictions[predictions["gene"] == gene]
        if d.empty:
            ax.set_title(f"{label}: {gene} (no predictions)", fontsize=9)
            continue
        y, yh = d["y"].to_numpy(float), d["y_hat"].to_numpy(float)
        r = stats.pearsonr(y, yh)[0] if len(y) > 2 and np.std(y) > 0 and np.std(yh) > 0 else math.nan
        rho = stats.spearmanr(y, yh)[0] if len(y) > 2 else math.nan
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
    return _save(fig, out)


# --------------------------------------------------------------------------------------------
# spatial maps
# --------------------------------------------------------------------------------------------


def _cell_size(tiles: pd.DataFrame) -> float:
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
    cell = _cell_size(tiles)
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
    return _save(fig, out)


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
# panel redundancy (Figures A.1 / A.2)
# --------------------------------------------------------------------------------------------


class CorrelationAccumulator:
    """Streaming Pearson correlation of the columns of row blocks (float64 sums)."""

    def __init__(self, n_cols: int) -> None:
        self.n = 0
        self.s = np.zeros(n_cols)
        self.ss = np.zeros((n_cols, n_cols))

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        self.n += x.shape[0]
        self.s += x.sum(axis=0)
        self.ss += x.T @ x

    def corr(self) -> np.ndarray:
        if self.n < 2:
            return np.full(self.ss.shape, np.nan)
        mean = self.s / self.n
        cov = self.ss / self.n - np.outer(mean, mean)
        sd = np.sqrt(np.clip(np.diag(cov), 0, None))
        with np.errstate(invalid="ignore", divide="ignore"):
            c = cov / np.outer(sd, sd)
        c[~np.isfinite(c)] = np.nan
        tiny = sd < 1e-12
        c[tiny, :] = np.nan
        c[:, tiny] = np.nan
        return np.clip(c, -1, 1)


def source_target_correlation(blocks: Iterable[tuple[np.ndarray, Sequence[str]]], core: Sequence[str],
                              addon: Sequence[str]) -> pd.DataFrame:
    """Pearson correlation (rows = core genes, cols = add-on genes) of log1p tile counts.

    ``blocks`` yields ``(counts (N, G), genes (G))``; genes missing from a block count as 0.
    Zero-variance genes give NaN.
    """
    wanted = list(dict.fromkeys([*core, *addon]))
    pos = {g: i for i, g in enumerate(wanted)}
    acc = CorrelationAccumulator(len(wanted))
    for counts, genes in blocks:
        counts = np.asarray(counts)
        x = np.zeros((counts.shape[0], len(wanted)), dtype=np.float64)
        for j, g in enumerate(genes):
            if g in pos:
                x[:, pos[g]] = np.log1p(counts[:, j].astype(np.float64))
        acc.add(x)
    c = acc.corr()
    rows = [pos[g] for g in core]
    cols = [pos[g] for g in addon]
    return pd.DataFrame(c[np.ix_(rows, cols)], index=list(core), columns=list(addon))


def iter_token_store_counts(paths: Iterable[str | Path], block_rows: int = 50_000) -> Iterable[tuple[np.ndarray, list[str]]]:
    """Yield (tile_counts block, genes) from tokens.zarr stores (``tile_counts`` (N, G), attrs ``genes``)."""
    import zarr

    for path in paths:
        try:
            g = zarr.open_group(str(path), mode="r")
            arr = g["tile_counts"]
            genes = [str(x) for x in g.attrs["genes"]]
        except Exception as exc:
            raise InputError(f"cannot read tile_counts/genes ({exc})", file=path, field="tile_counts",
                             expected="tokens.zarr with array tile_counts (N, G) and attrs genes") from None
        if arr.shape[1] != len(genes):
            raise InputError(f"tile_counts has {arr.shape[1]} columns but {len(genes)} genes",
                             file=path, field="genes")
        for start in range(0, arr.shape[0], block_rows):
            yield np.asarray(arr[start:start + block_rows]), genes


def _cluster_order(m: np.ndarray, axis: int) -> np.ndarray:
    from scipy.cluster.hierarchy import leaves_list, linkage

    x = np.nan_to_num(m if axis == 0 else m.T)
    if x.shape[0] < 3:
        return np.arange(x.shape[0])
    return leaves_list(linkage(x, method="average", metric="euclidean"))


def plot_correlation_heatmap(corr: pd.DataFrame, out: str | Path, *, cluster: bool = True,
                             max_labels: int = 60) -> Path:
    """Figure A.1: heat map of core (rows) × add-on (cols) correlations."""
    m = corr.to_numpy(float)
    ri = _cluster_order(m, 0) if cluster else np.arange(m.shape[0])
    ci = _cluster_order(m, 1) if cluster else np.arange(m.shape[1])
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
    ax.set_ylabel(f"source (core) genes, n={m.shape[0]}")
    ax.set_xlabel(f"target (add-on) genes, n={m.shape[1]}")
    fig.colorbar(im, ax=ax, label="Pearson r (log1p tile counts)", shrink=0.7)
    return _save(fig, out)


def avg_source_correlation(corr: pd.DataFrame) -> pd.Series:
    """avg_src_corr per target (column): mean correlation with all source (core) genes."""
    return corr.mean(axis=0, skipna=True).rename("avg_src_corr")


def plot_predictability(avg_src_corr: pd.Series, per_gene: pd.DataFrame, out: str | Path, *,
                        settings: Sequence[str] | None = None, metric: str = "spearman") -> Path:
    """Figure A.2: per-target ``{metric}_mean`` vs avg_src_corr, one colour per setting, with the
    Spearman correlation of the relationship in the legend."""
    from scipy import stats

    col = f"{metric}_mean" if f"{metric}_mean" in per_gene else metric
    settings = list(settings) if settings else list(dict.fromkeys(per_gene["setting"]))
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    drawn = 0
    for i, s in enumerate(settings):
        d = per_gene[per_gene["setting"] == s].set_index("gene")[col]
        d = pd.concat([avg_src_corr, d.rename("v")], axis=1, join="inner").dropna()
        if d.empty:
            continue
        rho = stats.spearmanr(d["avg_src_corr"], d["v"])[0] if len(d) > 2 else math.nan
        ax.scatter(d["avg_src_corr"], d["v"], s=12, alpha=0.7, color=plt.get_cmap("tab10")(i % 10),
                   label=f"{s} (ρ={rho:.2f})")
        drawn += 1
    if not drawn:
        raise InputError("no target gene has both a correlation and a metric", field=col)
    ax.set_xlabel("avg_src_corr (mean Pearson r with core genes)")
    ax.set_ylabel(f"per-gene {metric.capitalize()}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, out)


# --------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------


def plot_clip_recall(table_a2: pd.DataFrame, out: str | Path) -> Path:
    """Grouped bars recall@1 / recall@5 (mean ± std) per CLIP setting; random baseline dashed."""
    df = table_a2[table_a2["setting"] != "random"].dropna(subset=["recall@1_mean"])
    if df.empty:
        raise InputError("no CLIP results", field="recall@1_mean")
    rnd = table_a2[table_a2["setting"] == "random"]
    x = np.arange(len(df))
    w = 0.38
    fig, ax = plt.subplots(figsize=(1.6 * len(df) + 2.5, 3.8))
    for k, (metric, color) in enumerate((("recall@1", "#1f77b4"), ("recall@5", "#ff7f0e"))):
        ax.bar(x + (k - 0.5) * w, df[f"{metric}_mean"], w, yerr=df[f"{metric}_std"].fillna(0), color=color,
               capsize=3, label=metric)
        if len(rnd) and np.isfinite(float(rnd[f"{metric}_mean"].iloc[0])):
            ax.axhline(float(rnd[f"{metric}_mean"].iloc[0]), color=color, ls="--", lw=1,
                       label=f"random {metric}")
    ax.set_xticks(x, df["setting"].astype(str))
    ax.set_ylabel("recall (test tiles)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def _read_csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


def _read_predictions(paths: Sequence[Path]) -> pd.DataFrame:
    parts = []
    for p in paths:
        try:
            d = pd.read_parquet(p, columns=["tile_id", "gene", "y", "y_hat"])
        except Exception as exc:
            raise InputError(f"cannot read predictions ({exc})", file=p,
                             expected="columns tile_id, gene, y, y_hat") from None
        parts.append(d)
    if not parts:
        return pd.DataFrame(columns=["tile_id", "gene", "y", "y_hat"])
    return pd.concat(parts, ignore_index=True)


def _families(table_a1: pd.DataFrame | None) -> dict[str, str]:
    if table_a1 is None or "family" not in table_a1:
        return {}
    return dict(zip(table_a1["setting"], table_a1["family"]))


def _predictability_settings(table_a1: pd.DataFrame, best: str, min_mae_setting: str) -> list[str]:
    chosen = [best]
    ok = table_a1.dropna(subset=["spearman_mean"]).sort_values("spearman_mean", ascending=False)
    for fam in ("morph-only", "expr-only"):
        d = ok[ok["family"] == fam]
        if len(d):
            chosen.append(str(d["setting"].iloc[0]))
    if min_mae_setting in set(ok["setting"]):
        chosen.append(min_mae_setting)
    return list(dict.fromkeys(chosen))


def make_plots(
    cohort_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    tables_dir: str | Path | None = None,
    samples: Mapping[str, Mapping[str, Any]] | None = None,
    prediction_paths: Sequence[str | Path] | None = None,
    token_stores: Mapping[str, str | Path] | None = None,
    panel_path: str | Path | None = None,
    plot_gene: str | None = None,
    spatial_samples: Sequence[str] | int | None = None,
    thumbnail_max_size: int = 1024,
    min_mae_setting: str = "min_mae",
) -> list[Path]:
    """Draw every figure of one cohort; returns the written paths.

    Reads ``{tables_dir}/table_a1.csv``, ``table_a2.csv``, ``per_gene.csv`` (default
    ``{cohort_dir}/tables``), the best setting's ``runs/{best}/fold*/predictions.parquet``
    (or those of ``prediction_paths`` under that setting), ``samples/{sample}/tiles.parquet``,
    ``samples/{sample}/tokens.zarr`` (``token_stores``) and ``panels/fold0.json``.
    ``samples``: sample -> {"he_path", "he_mpp"} for the H&E background of the spatial maps.
    ``spatial_samples``: list of samples, or the first N, or None for all.
    Figures whose inputs are absent (e.g. no CLIP runs) are skipped with a warning.
    """
    cohort_dir = Path(cohort_dir)
    tables_dir = Path(tables_dir) if tables_dir else cohort_dir / "tables"
    out_dir = Path(out_dir) if out_dir else tables_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    a1 = _read_csv(tables_dir / "table_a1.csv")
    a2 = _read_csv(tables_dir / "table_a2.csv")
    per_gene = _read_csv(tables_dir / "per_gene.csv")
    fam = _families(a1)

    best = None
    if a1 is not None and a1["spearman_mean"].notna().any():
        written.append(plot_setting_summary(a1, out_dir / "setting_summary.png"))
        best = str(a1.sort_values("spearman_mean", ascending=False, kind="mergesort")["setting"].iloc[0])
        log.info("best setting: %s", best)
    else:
        log.warning("no regression results: skipping summary, per-gene and spatial plots")

    if per_gene is not None and per_gene["spearman_mean"].notna().any():
        written.append(plot_per_gene_distribution(per_gene, out_dir / "per_gene_spearman.png", families=fam))

    gene = plot_gene
    preds = pd.DataFrame(columns=["tile_id", "gene", "y", "y_hat"])
    if best is not None and per_gene is not None:
        best_genes = per_gene[per_gene["setting"] == best].set_index("gene")["spearman_mean"]
        if prediction_paths is not None:
            ppaths = [Path(p) for p in prediction_paths if Path(p).parent.parent.name == best]
        else:
            ppaths = sorted((cohort_dir / "runs" / best).glob("fold*/predictions.parquet"))
        preds = _read_predictions(ppaths)
        if len(best_genes.dropna()) and len(preds):
            picks = select_genes(best_genes)
            written.append(plot_pred_vs_measured(preds, picks, out_dir / "pred_vs_measured.png",
                                                 title=f"{best}: best / median / worst gene (all test folds)"))
            gene = gene or picks["best"]
        else:
            log.warning("no predictions for %s: skipping predicted-vs-measured and spatial maps", best)

    if gene and len(preds):
        if gene not in set(preds["gene"]):
            raise InputError(f"gene {gene!r} has no predictions in setting {best!r}", field="tables.plot_gene",
                             expected="an add-on gene of the panel")
        g = preds[preds["gene"] == gene].drop_duplicates("tile_id").set_index("tile_id")
        sample_of = g.index.to_series().str.rsplit("__", n=1).str[0]
        names = list(dict.fromkeys(sample_of))
        if samples:
            names = [s for s in samples if s in set(names)] + [s for s in names if s not in samples]
        if isinstance(spatial_samples, int):
            names = names[:spatial_samples]
        elif spatial_samples is not None:
            names = [s for s in spatial_samples if s in set(names)]
        for sample in names:
            tiles_path = cohort_dir / "samples" / sample / "tiles.parquet"
            if not tiles_path.exists():
                log.warning("no tiles.parquet for %s: skipping its spatial map", sample)
                continue
            tiles = pd.read_parquet(tiles_path)
            y = tiles["tile_id"].map(g["y"]).to_numpy(float)
            yh = tiles["tile_id"].map(g["y_hat"]).to_numpy(float)
            info = (samples or {}).get(sample) or {}
            bg, ds = load_thumbnail(info.get("he_path"), info.get("he_mpp"), thumbnail_max_size)
            written.append(plot_spatial_map(tiles, y, yh, out_dir / f"spatial_{sample}.png", gene=gene,
                                            sample=sample, background=bg, downsample=ds))
            log.info("spatial map %s (%s)", sample, gene)

    panel_path = Path(panel_path) if panel_path else cohort_dir / "panels" / "fold0.json"
    if token_stores is None:
        token_stores = {p.parent.name: p for p in sorted((cohort_dir / "samples").glob("*/tokens.zarr"))}
    if panel_path.exists() and token_stores:
        panel = json.loads(panel_path.read_text())
        core, addon = list(panel.get("core") or []), list(panel.get("addon") or [])
        if not core or not addon:
            raise InputError("panel needs non-empty core and addon lists", file=panel_path, field="core/addon")
        corr = source_target_correlation(iter_token_store_counts(token_stores.values()), core, addon)
        with atomic_path(out_dir / "source_target_corr.csv") as tmp:
            corr.to_csv(tmp, float_format="%.5g")
        written.append(out_dir / "source_target_corr.csv")
        written.append(plot_correlation_heatmap(corr, out_dir / "source_target_corr.png"))
        if per_gene is not None and a1 is not None and best is not None:
            written.append(plot_predictability(avg_source_correlation(corr), per_gene,
                                               out_dir / "predictability_vs_redundancy.png",
                                               settings=_predictability_settings(a1, best, min_mae_setting)))
    else:
        log.warning("no panel (%s) or token stores: skipping correlation figures", panel_path)

    if a2 is not None and a2[a2["setting"] != "random"]["recall@1_mean"].notna().any():
        written.append(plot_clip_recall(a2, out_dir / "clip_recall.png"))
    else:
        log.info("no CLIP results: skipping clip_recall.png")
    log.info("wrote %d figures to %s", len(written), out_dir)
    return written
