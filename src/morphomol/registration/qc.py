"""``registration_qc.png``: per region, DAPI (green) and warped hematoxylin (magenta) overlay,
region polygon, landmark residual arrows (cyan inliers, red outliers), fit and NCC summary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from morphomol.errors import MorphomolError
from morphomol.registration.images import Raster, SlideSource, he_bbox, load_he
from morphomol.registration.refine import NCCProblem
from morphomol.registration.transform import Registration
from morphomol.util.atomic import atomic_path


@dataclass
class RegionQC:
    """What the QC figure shows of one region besides its transform."""

    fixed_um: np.ndarray  # (n, 2)
    residual_um: np.ndarray  # (n, 2)
    outliers: list[int]
    bbox_um: list[float]
    moving_px: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))


def write_qc_png(path: str | Path, reg: Registration, qc: list[RegionQC], dapi: Raster | None,
                 he: SlideSource | None, refine_mpp: float) -> None:
    """Write the QC figure (one panel per region) to ``path`` (PNG, atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(reg.regions)
    ncol = min(n, 3)
    nrow = int(math.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.0 * ncol, 6.2 * nrow), squeeze=False)
    for i, (r, q) in enumerate(zip(reg.regions, qc, strict=True)):
        ax = axes[i // ncol][i % ncol]
        x0, y0, x1, y1 = q.bbox_um
        if dapi is not None and he is not None:
            try:
                hb = he_bbox(r.inverse, q.bbox_um, pad_um=4 * refine_mpp)
                her = load_he(he, refine_mpp, hb)
                prob = NCCProblem(dapi, her, None, q.bbox_um, refine_mpp)
                step = max(refine_mpp, math.sqrt((x1 - x0) * (y1 - y0) / 250_000))
                g = prob.grid(step)
                hv, hvalid = prob.warped_he(r.matrix, g)
                rgb = np.zeros(g.gx.shape + (3,), np.float32)
                dn = np.where(g.mask, g.dapi, 0)
                hn = np.where(hvalid, hv, 0)
                rgb[..., 1] = dn / max(float(np.percentile(dn, 99.5)), 1e-6)
                hn = hn / max(float(np.percentile(hn, 99.5)), 1e-6)
                rgb[..., 0] = hn
                rgb[..., 2] = hn
                ax.imshow(np.clip(rgb, 0, 1), extent=(x0, x1, y1, y0), interpolation="nearest")
            except MorphomolError as exc:
                ax.text(0.5, 0.5, f"no image overlay: {exc.message}", transform=ax.transAxes, ha="center", wrap=True)
        if r.polygon_um is not None:
            pr = np.vstack([r.polygon_um, r.polygon_um[:1]])
            ax.plot(pr[:, 0], pr[:, 1], color="yellow", lw=1.0, label="region polygon")
        if len(q.fixed_um):
            res = np.nan_to_num(q.residual_um)
            norms = np.linalg.norm(res, axis=1)
            inl = np.ones(len(res), bool)
            inl[q.outliers] = False
            ref = float(np.median(norms[inl])) if inl.any() and np.median(norms[inl]) > 0 else 1.0
            key_um = float(10 ** math.floor(math.log10(max(ref, 1e-3))) * (5 if ref / 10 ** math.floor(math.log10(max(ref, 1e-3))) > 3 else 1))
            k = 0.05 * max(x1 - x0, y1 - y0) / max(ref, 1e-6)  # median arrow ≈ 5 % of the panel
            ax.scatter(q.fixed_um[inl, 0], q.fixed_um[inl, 1], s=18, facecolors="none", edgecolors="white",
                       label="landmark (DAPI)")
            qv = ax.quiver(q.fixed_um[:, 0], q.fixed_um[:, 1], res[:, 0], res[:, 1], angles="xy",
                           scale_units="xy", scale=1.0 / k, color=np.where(inl, "cyan", "red").tolist(), width=0.004)
            ax.quiverkey(qv, 0.06, 0.04, key_um, f"{key_um:g} µm residual (arrows ×{k:.0f})", labelpos="E",
                         coordinates="axes", color="cyan", labelcolor="white",
                         fontproperties={"size": 8})
            if q.outliers:
                o = q.fixed_um[q.outliers]
                ax.scatter(o[:, 0], o[:, 1], marker="x", s=60, c="red", label="outlier (excluded)")
                for j in q.outliers:
                    ax.annotate(f"#{j}", q.fixed_um[j], color="red", fontsize=8, xytext=(3, 3),
                                textcoords="offset points")
        rms = "n/a" if r.rms_um is None else f"{r.rms_um:.2f}"
        mx = "n/a" if r.max_um is None else f"{r.max_um:.2f}"
        sc = ""
        if r.refine_score_before is not None:
            sc = (f"\nNCC {r.refine_score_before:.3f} → {r.refine_score_after:.3f} "
                  f"({'refined' if r.refined else 'refinement not kept'})")
        ax.set_title(f"{r.name}: LOO RMS {rms} µm, max {mx} µm, n={r.n_landmarks}, "
                     f"outliers {len(r.outliers)}{sc}", fontsize=9)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y1, y0)
        ax.set_xlabel("x (Xenium µm)")
        ax.set_ylabel("y (Xenium µm)")
        ax.set_aspect("equal")
        ax.legend(loc="lower right", fontsize=7, framealpha=0.6)
    for j in range(n, nrow * ncol):
        axes[j // ncol][j % ncol].axis("off")
    fig.suptitle(f"{reg.sample}: {reg.method} — green: DAPI, magenta: H&E hematoxylin warped to Xenium "
                 f"({refine_mpp:g} µm/px)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


# ------------------------------------------------------------------ without a DAPI image
DENSITY_STEP_UM = 10.0  # µm per bin of the transcript density drawn over the H&E
_OFF = 1 << 24  # bin index offset (bins within ±16.7M steps: two non-negative 32-bit halves of one key)


class DensityGrid:
    """Transcript counts on a ``step`` µm grid, accumulated batch by batch (extent found on the way)."""

    def __init__(self, step: float = DENSITY_STEP_UM) -> None:
        self.step = float(step)
        self._counts: dict[int, int] = {}
        self.n = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        ok = np.isfinite(x) & np.isfinite(y)
        ix = np.floor(x[ok] / self.step).astype(np.int64)
        iy = np.floor(y[ok] / self.step).astype(np.int64)
        keys, cnt = np.unique((ix + _OFF) << 32 | (iy + _OFF), return_counts=True)
        for k, c in zip(keys.tolist(), cnt.tolist(), strict=True):
            self._counts[k] = self._counts.get(k, 0) + c
        self.n += int(ok.sum())

    def dense(self) -> tuple[np.ndarray, list[float]] | None:
        """(counts (ny, nx), extent [x0, y0, x1, y1] µm), or None without transcripts."""
        if not self._counts:
            return None
        keys = np.fromiter(self._counts.keys(), np.int64, len(self._counts))
        vals = np.fromiter(self._counts.values(), np.int64, len(self._counts))
        ix = (keys >> 32) - _OFF
        iy = (keys & 0xFFFFFFFF) - _OFF
        x0, y0 = int(ix.min()), int(iy.min())
        grid = np.zeros((int(iy.max()) - y0 + 1, int(ix.max()) - x0 + 1), np.int64)
        grid[iy - y0, ix - x0] = vals
        s = self.step
        return grid, [x0 * s, y0 * s, (ix.max() + 1) * s, (iy.max() + 1) * s]


def write_density_qc_png(path: str | Path, reg: Registration, slide: SlideSource, density: DensityGrid,
                         max_px: int = 1200) -> None:
    """QC without a morphology image: the H&E resampled into the µm frame (every region through its own
    affine) with the transcript density over it (magenta); transcripts off the tissue, or tissue
    without transcripts, show a misalignment at a glance."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from morphomol.registration.warp import he_in_um

    d = density.dense()
    fig, ax = plt.subplots(figsize=(7.5, 7.5))
    if d is None:
        ax.text(0.5, 0.5, "no transcripts", transform=ax.transAxes, ha="center")
    else:
        grid, (x0, y0, x1, y1) = d
        scalef = min(max_px / max(x1 - x0, y1 - y0), 1.0 / max(float(getattr(slide, "mpp", 1.0)), 1e-6))
        rgb, _ = he_in_um(slide, reg, (x0, y0, x1, y1), scalef)
        ax.imshow(rgb, extent=(x0, x1, y1, y0), interpolation="bilinear")
        v = np.log1p(grid.astype(float))
        rgba = np.zeros(grid.shape + (4,), np.float32)
        rgba[..., 0] = 0.85
        rgba[..., 2] = 0.85
        rgba[..., 3] = 0.7 * v / max(float(v.max()), 1e-9)
        ax.imshow(rgba, extent=(x0, x1, y1, y0), interpolation="nearest")
        ax.set_xlim(x0, x1)
        ax.set_ylim(y1, y0)
    for r in reg.regions:
        for ring in r.rings():
            pr = np.vstack([ring, ring[:1]])
            ax.plot(pr[:, 0], pr[:, 1], color="yellow", lw=1.0)
    ax.set_aspect("equal")
    ax.set_xlabel("x (µm)")
    ax.set_ylabel("y (µm)")
    ax.set_title(f"{reg.sample}: {reg.method} — H&E in the µm frame, transcript density (magenta, "
                 f"{density.step:g} µm bins, {density.n} transcripts)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
