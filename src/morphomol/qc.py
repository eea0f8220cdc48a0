"""Per-sample ingest / QC: stream a Xenium bundle once, open the H&E, write ``qc/``.

Outputs (all inside ``out_dir``, the rule's ``results/{cohort}/samples/{sample}/qc``
directory, written atomically as one directory):

* ``transcripts_per_gene.csv``: ``gene,count`` for every non-control gene present in the
  file (after the qv filter; genes whose transcripts were all filtered have count 0),
  sorted by gene name.
* ``summary.json``: counts, Xenium bbox (µm), pixel size, H&E dims/mpp/levels.
* ``thumbnail.png``: H&E thumbnail and the transcript density map side by side (they are
  not registered yet, so they are not overlaid).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from morphomol.util.atomic import atomic_path
from morphomol.errors import InputError
from morphomol.io.he import open_slide
from morphomol.io.xenium import XeniumBundle
from morphomol.util.logs import get_logger

__all__ = ["qc_sample", "check_panel_genes", "DensityGrid"]

log = get_logger("qc")


def check_panel_genes(
    bundle_genes: Iterable[str], panel_genes: Iterable[str], sample: str, file: str | Path | None
) -> None:
    """Raise InputError listing every panel gene absent from the sample's transcripts."""
    present = set(bundle_genes)
    missing = sorted({g for g in panel_genes if g not in present})
    if missing:
        shown = ", ".join(missing[:50]) + (f", ... ({len(missing) - 50} more)" if len(missing) > 50 else "")
        raise InputError(
            f"sample {sample}: {len(missing)} panel gene(s) absent from the transcripts: {shown}",
            file=file,
            field="feature_name",
            expected="every core/add-on gene of the cohort panel among the sample's feature names",
        )


class DensityGrid:
    """Transcript counts on a square µm grid that grows to cover whatever it is fed
    (streaming: the extent is unknown until the last batch)."""

    def __init__(self, bin_um: float = 10.0, max_bins: int = 4096) -> None:
        self.bin_um = float(bin_um)
        self.max_bins = int(max_bins)
        self.counts = np.zeros((0, 0), dtype=np.int64)
        self.ix0 = 0
        self.iy0 = 0

    def _coarsen(self) -> None:
        """Double the bin size (stray far-away coordinates must not blow up memory)."""
        h, w = self.counts.shape
        self.bin_um *= 2
        if h == 0:
            return
        nx0, ny0 = self.ix0 // 2, self.iy0 // 2
        cols = (self.ix0 + np.arange(w)) // 2 - nx0
        rows = (self.iy0 + np.arange(h)) // 2 - ny0
        out = np.zeros((int(rows[-1]) + 1, int(cols[-1]) + 1), dtype=np.int64)
        np.add.at(out, (rows[:, None], cols[None, :]), self.counts)
        self.counts, self.ix0, self.iy0 = out, nx0, ny0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        if x.size == 0:
            return
        while True:
            ix = np.floor(x / self.bin_um).astype(np.int64)
            iy = np.floor(y / self.bin_um).astype(np.int64)
            lo_x, hi_x, lo_y, hi_y = int(ix.min()), int(ix.max()), int(iy.min()), int(iy.max())
            h, w = self.counts.shape
            if h:
                lo_x, lo_y = min(lo_x, self.ix0), min(lo_y, self.iy0)
                hi_x, hi_y = max(hi_x, self.ix0 + w - 1), max(hi_y, self.iy0 + h - 1)
            if max(hi_x - lo_x + 1, hi_y - lo_y + 1) <= self.max_bins:
                break
            self._coarsen()
        lo_x, hi_x, lo_y, hi_y = int(ix.min()), int(ix.max()), int(iy.min()), int(iy.max())
        if h == 0:
            self.ix0, self.iy0 = lo_x, lo_y
            self.counts = np.zeros((hi_y - lo_y + 1, hi_x - lo_x + 1), dtype=np.int64)
        else:
            nx0, ny0 = min(self.ix0, lo_x), min(self.iy0, lo_y)
            nx1, ny1 = max(self.ix0 + w - 1, hi_x), max(self.iy0 + h - 1, hi_y)
            if (nx0, ny0, nx1, ny1) != (self.ix0, self.iy0, self.ix0 + w - 1, self.iy0 + h - 1):
                grown = np.zeros((ny1 - ny0 + 1, nx1 - nx0 + 1), dtype=np.int64)
                grown[self.iy0 - ny0 : self.iy0 - ny0 + h, self.ix0 - nx0 : self.ix0 - nx0 + w] = self.counts
                self.counts, self.ix0, self.iy0 = grown, nx0, ny0
        h, w = self.counts.shape
        flat = (iy - self.iy0) * w + (ix - self.ix0)
        self.counts += np.bincount(flat, minlength=h * w).reshape(h, w)

    @property
    def extent_um(self) -> tuple[float, float, float, float]:
        h, w = self.counts.shape
        return (self.ix0 * self.bin_um, self.iy0 * self.bin_um, (self.ix0 + w) * self.bin_um, (self.iy0 + h) * self.bin_um)


def _thumbnail_png(path: Path, he_rgb: np.ndarray, grid: DensityGrid, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 5), dpi=100)
    axes[0].imshow(he_rgb)
    axes[0].set_title("H&E (thumbnail)")
    axes[0].axis("off")
    x0, y0, x1, y1 = grid.extent_um
    im = axes[1].imshow(np.log1p(grid.counts), extent=(x0, x1, y1, y0), cmap="magma", interpolation="nearest")
    axes[1].set_title(f"transcripts / {grid.bin_um:g} µm bin (log1p)")
    axes[1].set_xlabel("x (µm)")
    axes[1].set_ylabel("y (µm)")
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    with open(path, "wb") as fh:
        fig.savefig(fh, format="png", bbox_inches="tight")
    plt.close(fig)


def _clean_mpp(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def qc_sample(
    xenium_dir: str | Path,
    he_path: str | Path,
    he_mpp: float | str | None,
    out_dir: str | Path,
    sample_id: str,
    qv_min: float | None = 20.0,
    batch_size: int = 2_000_000,
    panel_genes: Sequence[str] | None = None,
    thumbnail_size: int = 1024,
    density_bin_um: float = 10.0,
) -> dict[str, Any]:
    """Stream one sample, check it, write ``out_dir`` (= ``.../samples/{sample}/qc``).

    Raises InputError (and writes nothing) for unreadable inputs or when a panel gene is
    absent from the transcripts. Returns the summary dict.
    """
    out_dir = Path(out_dir)
    bundle = XeniumBundle(xenium_dir)
    log.info("sample %s: %r", sample_id, bundle)
    genes = bundle.genes  # one streamed pass over feature_name only
    if panel_genes:
        check_panel_genes(genes, panel_genes, sample_id, bundle.transcripts_path)
    slide = open_slide(he_path, mpp=_clean_mpp(he_mpp))
    try:
        he_rgb, he_ds = slide.thumbnail(thumbnail_size)
        he_info = {
            "path": str(he_path),
            "width": int(slide.dimensions[0]),
            "height": int(slide.dimensions[1]),
            "mpp": slide.mpp,
            "mpp_source": slide.mpp_source,
            "level_count": slide.level_count,
            "level_dimensions": [list(d) for d in slide.level_dimensions],
            "backend": slide.backend,
            "thumbnail_downsample": he_ds,
        }
    finally:
        slide.close()

    counts = np.zeros(len(genes), dtype=np.int64)
    grid = DensityGrid(density_bin_um)
    n_rows = n_ctrl = n_lowqv = 0
    bbox = [math.inf, math.inf, -math.inf, -math.inf]
    n_batches = 0
    for batch in bundle.iter_transcripts(batch_size=batch_size, qv_min=qv_min, drop_controls=True):
        n_batches += 1
        n_rows += batch.n_rows_read
        n_ctrl += batch.n_controls_dropped
        n_lowqv += batch.n_low_qv_dropped
        counts += np.bincount(batch.gene_codes, minlength=len(genes))
        bbox[0] = min(bbox[0], float(batch.x.min()))
        bbox[1] = min(bbox[1], float(batch.y.min()))
        bbox[2] = max(bbox[2], float(batch.x.max()))
        bbox[3] = max(bbox[3], float(batch.y.max()))
        grid.add(batch.x, batch.y)
        log.info("sample %s: batch %d, %d rows read so far", sample_id, n_batches, n_rows)
    n_kept = int(counts.sum())

    summary = {
        "sample": sample_id,
        "transcripts_path": str(bundle.transcripts_path),
        "n_rows": n_rows,
        "n_transcripts": n_kept,
        "n_genes": int((counts > 0).sum()),
        "n_genes_present": len(genes),
        "n_controls_dropped": n_ctrl,
        "n_low_qv_dropped": n_lowqv,
        "qv_min": qv_min,
        "xenium_bbox_um": bbox,
        "pixel_size": bundle.pixel_size,
        "morphology_path": str(bundle.morphology_path) if bundle.morphology_path else None,
        "panel_genes_checked": len(panel_genes or []),
        "he": he_info,
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        with open(tmp / "transcripts_per_gene.csv", "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["gene", "count"])
            writer.writerows(zip(genes, counts.tolist()))
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        _thumbnail_png(tmp / "thumbnail.png", he_rgb, grid, f"{sample_id}: {n_kept:,} transcripts, {int((counts > 0).sum())} genes")
    log.info(
        "sample %s: %d transcripts kept of %d (%d controls, %d qv<%s dropped), H&E %dx%d @ %.4g µm/px -> %s",
        sample_id, n_kept, n_rows, n_ctrl, n_lowqv, qv_min, he_info["width"], he_info["height"], he_info["mpp"], out_dir,
    )
    return summary
