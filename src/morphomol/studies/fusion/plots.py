"""Figures of the fusion study (PNG, matplotlib Agg), drawn by the ``plots`` rule from explicit files:

* ``setting_summary.png``   mean Spearman ± std per setting (Figure 2A style)
* ``per_gene_spearman.png`` per-gene Spearman distribution per setting (box plots)
* ``pred_vs_measured.png``  predicted vs measured for the best / median / worst gene (Figure A.3)
* ``spatial_{sample}.png``  measured and predicted expression of one gene over the H&E thumbnail
* ``source_target_corr.png`` (+ ``.csv``) core × add-on Pearson correlation (Figure A.1)
* ``predictability_vs_redundancy.png``  per-target Spearman vs avg_src_corr (Figure A.2)
* ``clip_recall.png``       CLIP recall@1/@5 with the random baseline (Table A.2)

Generic pieces (saving, spatial maps, heat maps, pred-vs-measured) live in :mod:`morphomol.report.figures`.
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

from morphomol.data.runs import read_predictions  # noqa: E402
from morphomol.errors import InputError  # noqa: E402
from morphomol.eval.metrics import spearman  # noqa: E402
from morphomol.eval.stats import CorrelationAccumulator  # noqa: E402
from morphomol.report.figures import (  # noqa: E402
    horizontal_boxplot,
    load_thumbnail,
    plot_correlation_heatmap,
    plot_pred_vs_measured,
    plot_spatial_map,
    save_figure,
    select_genes,
)
from morphomol.util.atomic import atomic_path  # noqa: E402
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
MIN_MAE_FAMILY = "baseline (Min-MAE)"


def _color(family: str | None) -> str:
    return FAMILY_COLORS.get(family or "other", FAMILY_COLORS["other"])


# --------------------------------------------------------------------------------------------
# per-setting summaries
# --------------------------------------------------------------------------------------------


def plot_setting_summary(table_a1: pd.DataFrame, out: str | Path, metric: str = "spearman") -> Path:
    """Horizontal bars of ``{metric}_mean`` ± ``{metric}_std`` per setting, coloured by family."""
    from matplotlib.patches import Rectangle

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
    return save_figure(fig, out)


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
    bp = horizontal_boxplot(ax, [groups[s] for s in order], patch_artist=True, widths=0.6,
                            flierprops={"markersize": 2})
    ax.set_yticks(range(1, len(order) + 1), order)
    for patch, s in zip(bp["boxes"], order):
        patch.set_facecolor(_color((families or {}).get(s)))
        patch.set_alpha(0.7)
    ax.set_xlabel(f"per-gene {metric.capitalize()} (mean across folds)")
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, out)


# --------------------------------------------------------------------------------------------
# panel redundancy (Figures A.1 / A.2)
# --------------------------------------------------------------------------------------------


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


def avg_source_correlation(corr: pd.DataFrame) -> pd.Series:
    """avg_src_corr per target (column): mean correlation with all source (core) genes."""
    return corr.mean(axis=0, skipna=True).rename("avg_src_corr")


def plot_predictability(avg_src_corr: pd.Series, per_gene: pd.DataFrame, out: str | Path, *,
                        settings: Sequence[str] | None = None, metric: str = "spearman") -> Path:
    """Figure A.2: per-target ``{metric}_mean`` vs avg_src_corr, one colour per setting, with the
    Spearman correlation of the relationship in the legend."""
    col = f"{metric}_mean" if f"{metric}_mean" in per_gene else metric
    settings = list(settings) if settings else list(dict.fromkeys(per_gene["setting"]))
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    drawn = 0
    for i, s in enumerate(settings):
        d = per_gene[per_gene["setting"] == s].set_index("gene")[col]
        d = pd.concat([avg_src_corr, d.rename("v")], axis=1, join="inner").dropna()
        if d.empty:
            continue
        rho = spearman(d["avg_src_corr"], d["v"]) if len(d) > 2 else math.nan
        ax.scatter(d["avg_src_corr"], d["v"], s=12, alpha=0.7, color=plt.get_cmap("tab10")(i % 10),
                   label=f"{s} (ρ={rho:.2f})")
        drawn += 1
    if not drawn:
        plt.close(fig)
        raise InputError("no target gene has both a correlation and a metric", field=col)
    ax.set_xlabel("avg_src_corr (mean Pearson r with core genes)")
    ax.set_ylabel(f"per-gene {metric.capitalize()}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, out)


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
    return save_figure(fig, out)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def _read_csv(path: str | Path | None) -> pd.DataFrame | None:
    return pd.read_csv(path) if path is not None and Path(path).exists() else None


def _families(table_a1: pd.DataFrame | None) -> dict[str, str]:
    if table_a1 is None or "family" not in table_a1:
        return {}
    return dict(zip(table_a1["setting"], table_a1["family"]))


def _predictability_settings(table_a1: pd.DataFrame, best: str) -> list[str]:
    """The best setting, the best morph-only and expr-only ones, and the Min-MAE baseline."""
    chosen = [best]
    ok = table_a1.dropna(subset=["spearman_mean"]).sort_values("spearman_mean", ascending=False)
    for fam in ("morph-only", "expr-only"):
        d = ok[ok["family"] == fam]
        if len(d):
            chosen.append(str(d["setting"].iloc[0]))
    min_mae = table_a1[(table_a1["family"] == MIN_MAE_FAMILY) & table_a1["setting"].isin(set(ok["setting"]))]
    if len(min_mae):
        chosen.append(str(min_mae["setting"].iloc[0]))
    return list(dict.fromkeys(chosen))


def _spatial_maps(preds: pd.DataFrame, gene: str, best: str, out_dir: Path, *, tiles: Mapping[str, str | Path],
                  slides: Mapping[str, Mapping[str, Any]], spatial_samples: Sequence[str] | int | None,
                  thumbnail_max_size: int) -> list[Path]:
    if gene not in set(preds["gene"]):
        raise InputError(f"gene {gene!r} has no predictions in setting {best!r}", field="tables.plot_gene",
                         expected="an add-on gene of the panel")
    g = preds[preds["gene"] == gene].drop_duplicates("tile_id").set_index("tile_id")
    sample_of = g.index.to_series().astype(str).str.rsplit("__", n=1).str[0]
    names = list(dict.fromkeys(sample_of))
    if slides:
        names = [s for s in slides if s in set(names)] + [s for s in names if s not in slides]
    if isinstance(spatial_samples, int):
        names = names[:spatial_samples]
    elif spatial_samples is not None:
        names = [s for s in spatial_samples if s in set(names)]
    written = []
    for sample in names:
        tiles_path = tiles.get(sample)
        if tiles_path is None or not Path(tiles_path).exists():
            log.warning("no tiles.parquet for %s: skipping its spatial map", sample)
            continue
        t = pd.read_parquet(tiles_path)
        y = t["tile_id"].map(g["y"]).to_numpy(float)
        yh = t["tile_id"].map(g["y_hat"]).to_numpy(float)
        info = slides.get(sample) or {}
        bg, ds = load_thumbnail(info.get("he_path"), info.get("he_mpp"), thumbnail_max_size)
        written.append(plot_spatial_map(t, y, yh, out_dir / f"spatial_{sample}.png", gene=gene, sample=sample,
                                        background=bg, downsample=ds))
        log.info("spatial map %s (%s)", sample, gene)
    return written


def read_gene_predictions(paths: Sequence[str | Path], genes: Sequence[str]) -> pd.DataFrame:
    """``tile_id, gene, y, y_hat`` rows of ``genes`` only, of several ``predictions.parquet`` (concatenated in
    order, each file's rows in its order: the rows :func:`read_predictions` gives for these genes), read
    through a pyarrow filter (memory: the kept rows)."""
    import pyarrow.parquet as pq

    from morphomol.data.runs import PREDICTION_COLUMNS

    parts = []
    for p in paths:
        try:
            t = pq.read_table(p, columns=list(PREDICTION_COLUMNS), filters=[("gene", "in", sorted(set(genes)))])
        except Exception as exc:
            raise InputError(f"cannot read predictions ({exc})", file=p,
                             expected="columns tile_id, gene, y, y_hat") from None
        parts.append(t.to_pandas())
    if not parts:
        return read_predictions([])
    return pd.concat(parts, ignore_index=True)


def make_plots(
    out_dir: str | Path,
    *,
    table_a1: str | Path | None,
    table_a2: str | Path | None,
    per_gene: str | Path | None,
    predictions: Mapping[str, Sequence[str | Path]],
    tiles: Mapping[str, str | Path],
    token_stores: Mapping[str, str | Path],
    panel: str | Path | None,
    slides: Mapping[str, Mapping[str, Any]] | None = None,
    cfg: Any = None,
) -> list[Path]:
    """Draw every figure of one cohort into ``out_dir``; returns the written paths.

    Reads only the files it is given: ``table_a1`` / ``table_a2`` / ``per_gene`` (the tables rule's
    CSVs), ``predictions`` (setting -> predictions.parquet of its regression runs; the best
    setting's are used), ``tiles`` (sample -> tiles.parquet, for the spatial maps),
    ``token_stores`` (sample -> tokens.zarr) and ``panel`` (fold0 panel json) for the correlation
    figures, ``slides`` (sample -> ``{"he_path", "he_mpp"}``) for the H&E background.
    ``cfg``: the ``tables`` config section (``plot_gene``: gene of the spatial maps, None = best;
    ``spatial_samples``: list of samples, the first N, or None for all; ``thumbnail_max_size``).
    Figures whose inputs are absent (e.g. no CLIP runs) are skipped with a warning.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slides = dict(slides or {})
    plot_gene = getattr(cfg, "plot_gene", None)
    spatial_samples = getattr(cfg, "spatial_samples", None)
    thumbnail_max_size = int(getattr(cfg, "thumbnail_max_size", None) or 1024)
    written: list[Path] = []
    a1, a2, pg = _read_csv(table_a1), _read_csv(table_a2), _read_csv(per_gene)

    best = None
    if a1 is not None and a1["spearman_mean"].notna().any():
        written.append(plot_setting_summary(a1, out_dir / "setting_summary.png"))
        best = str(a1.sort_values("spearman_mean", ascending=False, kind="mergesort")["setting"].iloc[0])
        log.info("best setting: %s", best)
    else:
        log.warning("no regression results: skipping summary, per-gene and spatial plots")

    if pg is not None and pg["spearman_mean"].notna().any():
        written.append(plot_per_gene_distribution(pg, out_dir / "per_gene_spearman.png", families=_families(a1)))

    gene = plot_gene
    preds = read_predictions([])
    if best is not None and pg is not None:
        best_genes = pg[pg["setting"] == best].set_index("gene")["spearman_mean"]
        if len(best_genes.dropna()):
            picks = select_genes(best_genes)
            # only the rows of the drawn genes (all test folds): tiles x 4 genes, not tiles x every target
            preds = read_gene_predictions(predictions.get(best) or [], [*picks.values(), *([gene] if gene else [])])
        if len(best_genes.dropna()) and len(preds):
            written.append(plot_pred_vs_measured(preds, picks, out_dir / "pred_vs_measured.png",
                                                 title=f"{best}: best / median / worst gene (all test folds)"))
            gene = gene or picks["best"]
        else:
            log.warning("no predictions for %s: skipping predicted-vs-measured and spatial maps", best)

    if gene and len(preds):
        written += _spatial_maps(preds, gene, str(best), out_dir, tiles=tiles, slides=slides,
                                 spatial_samples=spatial_samples, thumbnail_max_size=thumbnail_max_size)

    if panel is not None and Path(panel).exists() and token_stores:
        doc = json.loads(Path(panel).read_text())
        core, addon = list(doc.get("core") or []), list(doc.get("addon") or [])
        if not core or not addon:
            raise InputError("panel needs non-empty core and addon lists", file=panel, field="core/addon")
        corr = source_target_correlation(iter_token_store_counts(token_stores.values()), core, addon)
        with atomic_path(out_dir / "source_target_corr.csv") as tmp:
            corr.to_csv(tmp, float_format="%.5g")
        written.append(out_dir / "source_target_corr.csv")
        written.append(plot_correlation_heatmap(corr, out_dir / "source_target_corr.png"))
        if pg is not None and a1 is not None and best is not None:
            written.append(plot_predictability(avg_source_correlation(corr), pg,
                                               out_dir / "predictability_vs_redundancy.png",
                                               settings=_predictability_settings(a1, best)))
    else:
        log.warning("no panel (%s) or token stores: skipping correlation figures", panel)

    if a2 is not None and a2[a2["setting"] != "random"]["recall@1_mean"].notna().any():
        written.append(plot_clip_recall(a2, out_dir / "clip_recall.png"))
    else:
        log.info("no CLIP results: skipping clip_recall.png")
    log.info("wrote %d figures to %s", len(written), out_dir)
    return written
