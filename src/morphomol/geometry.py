"""Geometry shared by registration, tiling, tokens and the simulator.

Affines
-------
Matrices are 3×3 and act on column vectors ``[x, y, 1]``: :func:`apply_affine`,
:func:`apply_points` and the elementary matrices :func:`translate`, :func:`scale`,
:func:`rotation`, :func:`shear`. A registration region maps H&E level-0 px → Xenium µm
(``matrix``) and back (``inverse``).

The tile grid
-------------
All tile geometry lives in level-0 H&E pixels. A :class:`TileGrid` has an origin
``(ox, oy)`` (the top-left of the transcript-covered area), a tile side ``size_px`` =
``tile_px * tile_mpp / he_mpp`` and a stride ``stride_px`` (both may be fractional). Tile
``(i, j)`` (column ``i``, row ``j``) covers the half-open box
``[ox + i*stride, ox + i*stride + size) x [oy + j*stride, oy + j*stride + size)``.

Each tile is cut into ``grid x grid`` (14 x 14) tokens; a token is a 16-px patch of the
224-px stored image, i.e. ``size/grid`` level-0 px. Because the stride is a whole number
``s`` of patches (``s = grid*stride/size``, 7 for the defaults), token boundaries of
overlapping tiles coincide: every point has one *global patch* ``(P_x, P_y) =
floor((x - ox) / patch_px), floor((y - oy) / patch_px)`` and belongs to token
``(P_y - j*s) * grid + (P_x - i*s)`` (row-major, row = y) of every tile ``(i, j)`` with
``i*s <= P_x < i*s + grid`` (and the same for y). Intervals are half-open everywhere: a
point exactly on a border belongs to the tile/patch on its right/bottom. The grid is
also cut into *cells* of ``s x s`` patches (one stride); tile ``(i, j)`` is cells
``[i, i+k) x [j, j+k)`` with ``k = size/stride`` (2 for the defaults).

Locating transcripts
--------------------
A transcript at Xenium µm ``(x, y)`` of region ``r`` goes through the region's inverse
(µm → level-0 H&E px) composed with the grid's px → patch affine
(:func:`um_to_patch_matrices`, shape (R, 2, 3)) to global patch coordinates ``(fx, fy)``.
:func:`locate_kernel` is the one jitted function that does this (plus the bounds check);
the tiling count kernel and the token binning kernel both call it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from morphomol.errors import InputError
from morphomol.util.numba import njit_kernels, numba_module

__all__ = [
    "Batch",
    "TileGrid",
    "apply_affine",
    "apply_points",
    "check_regions",
    "grid_from_attrs",
    "locate_kernel",
    "region_matrices",
    "rotation",
    "scale",
    "shear",
    "translate",
    "um_to_patch_matrices",
]


# ----------------------------------------------------------------------------- affines
def apply_affine(m: np.ndarray, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """Apply a 3×3 affine to coordinate arrays; returns float64 arrays of the broadcast shape."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]


def apply_points(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply a 3×3 affine to an (n, 2) point array; returns (n, 2) float64."""
    x, y = apply_affine(m, pts[:, 0], pts[:, 1])
    return np.stack([x, y], axis=1)


def translate(tx: float, ty: float) -> np.ndarray:
    """3×3 translation by ``(tx, ty)``."""
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def scale(sx: float, sy: float | None = None) -> np.ndarray:
    """3×3 scaling (isotropic when ``sy`` is None)."""
    return np.diag([sx, sx if sy is None else sy, 1.0])


def rotation(theta: float, flip: bool = False) -> np.ndarray:
    """3×3 counter-clockwise rotation by ``theta`` radians, after a y-flip when ``flip``."""
    c, s = math.cos(theta), math.sin(theta)
    r = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return r @ np.diag([1.0, -1.0, 1.0]) if flip else r


def shear(k: float) -> np.ndarray:
    """3×3 shear ``x' = x + k y``."""
    return np.array([[1.0, k, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


# ----------------------------------------------------------------------------- tile grid
@dataclass(frozen=True)
class TileGrid:
    """Regular grid of overlapping square tiles in level-0 H&E pixels (see module doc)."""

    origin_x: float
    origin_y: float
    size_px: float
    stride_px: float
    nx: int
    ny: int
    grid: int = 14

    def __post_init__(self) -> None:
        k = self.size_px / self.stride_px
        if abs(k - round(k)) > 1e-9 or round(k) < 1:
            raise InputError(
                f"tile size {self.size_px:g} px is not a whole multiple of the stride {self.stride_px:g} px",
                field="tiling.stride_px", expected="stride_px dividing tile_px (e.g. 512 / 256)",
            )
        s = self.grid / round(k)
        if abs(s - round(s)) > 1e-9:
            raise InputError(
                f"the stride ({self.stride_px:g} px) is not a whole number of tokens "
                f"(grid {self.grid}, tile {self.size_px:g} px)",
                field="tiling.stride_px", expected="grid * stride / tile size to be an integer",
            )

    @classmethod
    def covering(cls, bbox: Sequence[float], size_px: float, stride_px: float, grid: int = 14) -> TileGrid:
        """Smallest grid with origin at ``bbox[:2]`` whose tiles cover ``bbox`` (x0, y0, x1, y1)."""
        x0, y0, x1, y1 = (float(v) for v in bbox)
        nx = max(1, int(math.ceil((x1 - x0 - size_px) / stride_px - 1e-9)) + 1)
        ny = max(1, int(math.ceil((y1 - y0 - size_px) / stride_px - 1e-9)) + 1)
        return cls(x0, y0, float(size_px), float(stride_px), nx, ny, grid)

    @property
    def k(self) -> int:
        """Tiles per cell along one axis (= size / stride)."""
        return int(round(self.size_px / self.stride_px))

    @property
    def s(self) -> int:
        """Stride in patches (tokens)."""
        return int(round(self.grid / self.k))

    @property
    def patch_px(self) -> float:
        return self.size_px / self.grid

    @property
    def n_patch_x(self) -> int:
        return (self.nx - 1) * self.s + self.grid

    @property
    def n_patch_y(self) -> int:
        return (self.ny - 1) * self.s + self.grid

    @property
    def n_cell_x(self) -> int:
        return self.nx + self.k - 1

    @property
    def n_cell_y(self) -> int:
        return self.ny + self.k - 1

    def px_to_patch(self) -> np.ndarray:
        """3x3 affine: level-0 H&E px -> global patch coordinates (floor gives the patch)."""
        p = self.patch_px
        return np.array([[1.0 / p, 0.0, -self.origin_x / p], [0.0, 1.0 / p, -self.origin_y / p], [0.0, 0.0, 1.0]])

    def tile_origin(self, i: np.ndarray | int, j: np.ndarray | int) -> tuple[Any, Any]:
        """Level-0 px of the top-left corner of tile(s) ``(i, j)``."""
        return self.origin_x + np.asarray(i) * self.stride_px, self.origin_y + np.asarray(j) * self.stride_px

    def to_dict(self) -> dict[str, Any]:
        """The grid as stored in ``tiles.zarr`` attrs (``grid``); inverse of :func:`grid_from_attrs`."""
        return {"origin_x": self.origin_x, "origin_y": self.origin_y, "size_px": self.size_px,
                "stride_px": self.stride_px, "nx": self.nx, "ny": self.ny, "grid": self.grid}


def grid_from_attrs(attrs: dict[str, Any]) -> TileGrid:
    """The :class:`TileGrid` stored under ``attrs["grid"]`` (``tiles.zarr`` attrs)."""
    g = attrs["grid"]
    return TileGrid(float(g["origin_x"]), float(g["origin_y"]), float(g["size_px"]), float(g["stride_px"]),
                    int(g["nx"]), int(g["ny"]), int(g["grid"]))


def region_matrices(reg: Any) -> tuple[list[np.ndarray | None], list[np.ndarray | None]]:
    """(inverse µm->px, matrix px->µm) per region of a Registration (None where missing)."""
    inv, fwd = [], []
    for r in reg.regions:
        m = getattr(r, "matrix", None)
        i = getattr(r, "inverse", None)
        fwd.append(None if m is None else np.asarray(m, float))
        if i is None and m is not None:
            i = np.linalg.inv(np.asarray(m, float))
        inv.append(None if i is None else np.asarray(i, float))
    return inv, fwd


def um_to_patch_matrices(grid: TileGrid, inverses: Sequence[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
    """Per-region composed affine µm -> global patch coordinates, shape (R, 2, 3) float64.

    ``inverses[r]`` maps Xenium µm -> level-0 H&E px for region r (None: no transform).
    Returns (matrices, has_transform). Regions without a transform get NaN rows.
    """
    P = grid.px_to_patch()
    R = max(1, len(inverses))
    out = np.full((R, 2, 3), np.nan)
    has = np.zeros(R, dtype=bool)
    for r, inv in enumerate(inverses):
        if inv is None:
            continue
        m = np.asarray(inv, dtype=np.float64)
        if m.shape != (3, 3) or not np.all(np.isfinite(m)):
            continue
        out[r] = (P @ m)[:2]
        has[r] = True
    return out, has


# ----------------------------------------------------------------------------- transcripts
@dataclass
class Batch:
    """Plain transcript batch as the locate kernels see it (no reader objects)."""

    x: np.ndarray  # float32 µm
    y: np.ndarray  # float32 µm
    region: np.ndarray  # int32 region index (-1 = dropped)
    codes: np.ndarray  # int32 gene codes into the batch's own names
    lut: np.ndarray  # int32 code -> sample gene index (-1 = skip)


def check_regions(region: np.ndarray, has_transform: np.ndarray, sample: str) -> None:
    """InputError if transcripts fall into a region without a transform (or an unknown region)."""
    R = len(has_transform)
    if region.size == 0:
        return
    rmax = int(region.max())
    if rmax >= R:
        n = int((region >= R).sum())
        raise InputError(f"sample {sample}: {n} transcripts assigned to region {rmax}, but the registration "
                         f"has only {R} region(s)", field="regions", expected="a transform for every region")
    if not has_transform.all():
        cnt = np.bincount(region[region >= 0], minlength=R)
        bad = np.flatnonzero((cnt > 0) & ~has_transform)
        if bad.size:
            r = int(bad[0])
            raise InputError(f"sample {sample}: {int(cnt[r])} transcripts fall in region {r}, which has no "
                             f"transform (matrix/inverse missing or not finite)", field=f"regions[{r}].inverse",
                             expected="a finite 3x3 affine for every region that receives transcripts")


def _build_locate() -> Any:
    nb = numba_module()

    @nb.njit(cache=True, nogil=True)
    def locate(M, r, x, y, npx, npy):  # pragma: no cover - jitted
        # region r's affine µm -> global patch coordinates; the patch (px, py), or (-1, -1)
        # outside [0, npx) x [0, npy) (NaN rows of regions without a transform are outside)
        xf = np.float64(x)
        yf = np.float64(y)
        fx = M[r, 0, 0] * xf + M[r, 0, 1] * yf + M[r, 0, 2]
        fy = M[r, 1, 0] * xf + M[r, 1, 1] * yf + M[r, 1, 2]
        if not (fx >= 0.0 and fx < npx and fy >= 0.0 and fy < npy):
            return np.int64(-1), np.int64(-1)
        return np.int64(fx), np.int64(fy)

    return locate


def locate_kernel() -> Any:
    """The jitted ``locate(M, r, x, y, npx, npy) -> (px, py)``: global patch of one transcript.

    ``M`` is :func:`um_to_patch_matrices`' (R, 2, 3) array, ``r`` the transcript's region,
    ``(x, y)`` its µm position, ``npx``/``npy`` the grid's patch counts (floats). Returns
    ``(-1, -1)`` when the point falls outside the grid. Meant to be called from other jitted
    kernels (a plain call: measured faster than ``inline="always"`` in the token binning kernel,
    equal in the count kernel; see benchmarks/bench_tokens.py). Compiled once per process; a
    change here invalidates the callers' disk cache too (numba keys closures by their cells).
    """
    return njit_kernels("geometry.locate", _build_locate)
