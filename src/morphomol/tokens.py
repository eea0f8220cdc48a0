"""Transcript -> tile -> token pooling (streaming), tokens.zarr, counts.h5ad, targets.parquet.

Mapping (see :mod:`morphomol.geometry` for the geometry): a transcript at Xenium µm
``(x, y)`` assigned to region ``r`` goes through the region's inverse affine (µm -> level-0
H&E px) composed with the grid's px -> patch affine into global patch coordinates
``(fx, fy)``; its global patch is ``(floor(fx), floor(fy))`` (half-open intervals), computed by
the shared kernel :func:`morphomol.geometry.locate_kernel`. Tokens
of overlapping tiles coincide with global patches, so counts are accumulated once per
(global patch, gene) and each kept tile's 196 tokens are read off that table — a
transcript therefore counts in every tile that contains it, exactly once per tile.

Accumulation: per batch, a numba kernel writes (compact patch id, gene) pairs into a
fixed-size buffer; when the buffer is full it is counting-sorted by patch (linear time) and
merged into a running CSR ``patch -> (gene, count)`` through a dense per-gene scratch row
(genes are sorted within each patch once, at the end). Memory is
the fixed buffer plus that CSR, whose size is bounded by the number of distinct
(patch, gene) pairs (<= patches x genes), not by the number of transcripts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.config.sections import IOConfig
from morphomol.errors import InputError
from morphomol.geometry import Batch, TileGrid, locate_kernel
from morphomol.util.atomic import atomic_path
from morphomol.util.logs import get_logger
from morphomol.util.numba import njit_kernels, numba_module

log = get_logger("tokens")

TOKEN_CHUNK = 1 << 17  # entries per chunk of tokens.zarr token/gene/count (~20 tiles of 6k entries)


def _build_kernels() -> dict[str, Any]:
    nb = numba_module()
    locate = locate_kernel()

    @nb.njit(cache=True, nogil=True)
    def bin_batch(x, y, reg, codes, lut, M, npx, npy, patch_map, buf_p, buf_g, nbuf):
        n = x.shape[0]
        for t in range(n):
            r = reg[t]
            if r < 0:
                continue
            g = lut[codes[t]]
            if g < 0:
                continue
            px, py = locate(M, r, x[t], y[t], npx, npy)
            if px < 0:
                continue
            pid = patch_map[py, px]
            if pid < 0:
                continue
            buf_p[nbuf] = pid
            buf_g[nbuf] = g
            nbuf += 1
        return nbuf

    @nb.njit(cache=True, nogil=True)
    def flush(bp, bg, n, npatch, G, old_indptr, old_gene, old_count):
        # counting sort of the buffer by patch (one scatter), then per patch: old entries +
        # new genes through a dense per-gene scratch (first-seen order; sorted at the end)
        cp = np.zeros(npatch + 1, np.int64)
        for i in range(n):
            cp[bp[i] + 1] += 1
        for p in range(npatch):
            cp[p + 1] += cp[p]
        pos = cp[:-1].copy()
        sg = np.empty(n, np.uint16)
        for i in range(n):
            p = bp[i]
            sg[pos[p]] = bg[i]
            pos[p] += 1
        old_nnz = old_indptr[npatch]
        cap = old_nnz + n
        ng = np.empty(cap, np.uint16)
        nc = np.empty(cap, np.uint32)
        ni = np.empty(npatch + 1, np.int64)
        scratch = np.zeros(G, np.uint32)
        touched = np.empty(G, np.int64)
        w = 0
        for p in range(npatch):
            ni[p] = w
            m = 0
            for e in range(old_indptr[p], old_indptr[p + 1]):
                g = old_gene[e]
                scratch[g] = old_count[e]
                touched[m] = g
                m += 1
            for e in range(cp[p], cp[p + 1]):
                g = sg[e]
                if scratch[g] == 0:
                    touched[m] = g
                    m += 1
                scratch[g] += 1
            for q in range(m):
                g = touched[q]
                ng[w] = g
                nc[w] = scratch[g]
                scratch[g] = 0
                w += 1
        ni[npatch] = w
        return ni, ng, nc

    @nb.njit(cache=True, nogil=True)
    def sort_within(indptr, gene, count, G):
        # sort each patch's genes (once, at the end: deterministic layout). Short runs:
        # insertion sort; long runs: counting through a dense scratch row (O(G)).
        scratch = np.zeros(G, np.uint32)
        for p in range(indptr.shape[0] - 1):
            a = indptr[p]
            b = indptr[p + 1]
            m = b - a
            if m * m > 4 * G:
                for i in range(a, b):
                    scratch[gene[i]] = count[i]
                w = a
                for g in range(G):
                    if scratch[g] != 0:
                        gene[w] = g
                        count[w] = scratch[g]
                        scratch[g] = 0
                        w += 1
                continue
            for i in range(a + 1, b):
                g = gene[i]
                c = count[i]
                j = i - 1
                while j >= a and gene[j] > g:
                    gene[j + 1] = gene[j]
                    count[j + 1] = count[j]
                    j -= 1
                gene[j + 1] = g
                count[j + 1] = c

    @nb.njit(cache=True, nogil=True)
    def tile_nnz(ti, tj, s, grid, patch_map, indptr):
        N = ti.shape[0]
        out = np.zeros(N, np.int64)
        for t in range(N):
            tot = 0
            for r in range(grid):
                for c in range(grid):
                    p = patch_map[tj[t] * s + r, ti[t] * s + c]
                    tot += indptr[p + 1] - indptr[p]
            out[t] = tot
        return out

    @nb.njit(cache=True, nogil=True)
    def fill_tiles(ti, tj, s, grid, patch_map, indptr, pg, pc, out_tok, out_gene, out_count, tile_counts):
        w = 0
        for t in range(ti.shape[0]):
            for r in range(grid):
                for c in range(grid):
                    p = patch_map[tj[t] * s + r, ti[t] * s + c]
                    tok = r * grid + c
                    for e in range(indptr[p], indptr[p + 1]):
                        out_tok[w] = tok
                        out_gene[w] = pg[e]
                        out_count[w] = pc[e]
                        tile_counts[t, pg[e]] += pc[e]
                        w += 1
        return w

    return {"bin_batch": bin_batch, "flush": flush, "sort_within": sort_within, "tile_nnz": tile_nnz,
            "fill_tiles": fill_tiles}


def _kernels() -> dict[str, Any]:
    """The jitted pooling kernels (compiled once per process, cached on disk)."""
    return njit_kernels("tokens", _build_kernels)


# ----------------------------------------------------------------------------- pooling core
def kept_patch_map(grid: TileGrid, tile_i: np.ndarray, tile_j: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense (n_patch_y, n_patch_x) int32 map global patch -> compact id (-1 = in no kept tile)."""
    cover = np.zeros((grid.n_patch_y, grid.n_patch_x), bool)
    s, g = grid.s, grid.grid
    for i, j in zip(np.asarray(tile_i), np.asarray(tile_j), strict=True):
        cover[j * s:j * s + g, i * s:i * s + g] = True
    pm = np.full(cover.shape, -1, np.int32)
    n = int(cover.sum())
    pm[cover] = np.arange(n, dtype=np.int32)
    return pm, n


@dataclass
class PatchCounts:
    """CSR over compact patches: genes (sorted within a patch) and counts."""

    indptr: np.ndarray  # (npatch+1,) int64
    gene: np.ndarray  # (nnz,) uint16
    count: np.ndarray  # (nnz,) uint32
    n_transcripts: int = 0  # transcripts accumulated (each once)


class PatchAccumulator:
    """Streaming (patch, gene) counter with bounded memory (fixed buffer + running CSR)."""

    def __init__(self, grid: TileGrid, patch_map: np.ndarray, npatch: int, n_genes: int, M: np.ndarray,
                 buffer_size: int = 1 << 23) -> None:
        if n_genes > 65535:
            raise InputError(f"{n_genes} genes: more than the 65535 tokens.zarr can index", field="genes")
        self.k = _kernels()
        self.grid, self.patch_map, self.npatch, self.G, self.M = grid, patch_map, npatch, max(1, n_genes), M
        self.buf_p = np.empty(buffer_size, np.int32)
        self.buf_g = np.empty(buffer_size, np.uint16)
        self.nbuf = 0
        self.indptr = np.zeros(npatch + 1, np.int64)
        self.gene = np.empty(0, np.uint16)
        self.count = np.empty(0, np.uint32)
        self.n_transcripts = 0
        self.n_flushes = 0

    def add(self, x: np.ndarray, y: np.ndarray, region: np.ndarray, codes: np.ndarray, lut: np.ndarray) -> None:
        cap = len(self.buf_p)
        region = region.astype(np.int32, copy=False)
        codes = codes.astype(np.int32, copy=False)
        lut = lut.astype(np.int32, copy=False)
        npx, npy = float(self.grid.n_patch_x), float(self.grid.n_patch_y)
        for a in range(0, len(x), cap):
            b = min(len(x), a + cap)
            if self.nbuf + (b - a) > cap:
                self._flush()
            before = self.nbuf
            self.nbuf = self.k["bin_batch"](x[a:b], y[a:b], region[a:b], codes[a:b], lut, self.M, npx, npy,
                                            self.patch_map, self.buf_p, self.buf_g, self.nbuf)
            self.n_transcripts += self.nbuf - before

    def _flush(self) -> None:
        if self.nbuf == 0:
            return
        self.indptr, self.gene, self.count = self.k["flush"](self.buf_p, self.buf_g, self.nbuf, self.npatch, self.G,
                                                             self.indptr, self.gene, self.count)
        self.nbuf = 0
        self.n_flushes += 1

    def result(self) -> PatchCounts:
        self._flush()
        nnz = int(self.indptr[-1])
        gene, count = self.gene[:nnz].copy(), self.count[:nnz].copy()
        self.gene = self.count = np.empty(0)
        self.k["sort_within"](self.indptr, gene, count, self.G)
        return PatchCounts(self.indptr, gene, count, self.n_transcripts)


def pool_patches(batches: Iterable[Batch], grid: TileGrid, tile_i: np.ndarray, tile_j: np.ndarray, M: np.ndarray,
                 n_genes: int, *, buffer_size: int = 1 << 23, check: Any = None) -> tuple[PatchCounts, np.ndarray]:
    """Second streaming pass: (patch, gene) counts for all patches of the kept tiles.

    ``M`` (R, 2, 3): per-region µm -> global patch affine (:func:`morphomol.geometry.um_to_patch_matrices`).
    Returns (PatchCounts, patch_map)."""
    pm, npatch = kept_patch_map(grid, tile_i, tile_j)
    acc = PatchAccumulator(grid, pm, npatch, n_genes, M, buffer_size)
    for b in batches:
        if check is not None:
            check(b)
        acc.add(b.x, b.y, b.region, b.codes, b.lut)
    return acc.result(), pm


def tile_tokens(pc: PatchCounts, pm: np.ndarray, grid: TileGrid, tile_i: np.ndarray, tile_j: np.ndarray, n_genes: int,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """In-memory CSR over tiles: (indptr, token uint8, gene uint16, count uint32, tile_counts (N,G) uint32)."""
    k = _kernels()
    ti = np.asarray(tile_i, np.int64)
    tj = np.asarray(tile_j, np.int64)
    nnz = k["tile_nnz"](ti, tj, grid.s, grid.grid, pm, pc.indptr)
    indptr = np.zeros(len(ti) + 1, np.int64)
    np.cumsum(nnz, out=indptr[1:])
    tok = np.empty(indptr[-1], np.uint8)
    gene = np.empty(indptr[-1], np.uint16)
    cnt = np.empty(indptr[-1], np.uint32)
    tc = np.zeros((len(ti), max(1, n_genes)), np.uint32)
    k["fill_tiles"](ti, tj, grid.s, grid.grid, pm, pc.indptr, pc.gene, pc.count, tok, gene, cnt, tc)
    return indptr, tok, gene, cnt, tc[:, :n_genes]


def reference_tokens(x: np.ndarray, y: np.ndarray, region: np.ndarray, gene: np.ndarray, M: np.ndarray,
                     grid: TileGrid, tile_i: np.ndarray, tile_j: np.ndarray, n_genes: int) -> np.ndarray:
    """Brute force (for tests): dense (N, grid*grid, G) counts by point-in-box over every tile and token.

    Each token box is the half-open interval ``[i*s + c, i*s + c + 1)`` in global patch
    coordinates (x), same for y; the point's patch coordinates use the same composed affine."""
    N = len(tile_i)
    out = np.zeros((N, grid.grid * grid.grid, n_genes), np.int64)
    ok = region >= 0
    r = np.where(ok, region, 0)
    xf = x.astype(np.float64)
    yf = y.astype(np.float64)
    fx = M[r, 0, 0] * xf + M[r, 0, 1] * yf + M[r, 0, 2]
    fy = M[r, 1, 0] * xf + M[r, 1, 1] * yf + M[r, 1, 2]
    for t in range(N):
        for row in range(grid.grid):
            ylo = tile_j[t] * grid.s + row
            iny = ok & (fy >= ylo) & (fy < ylo + 1)
            if not iny.any():
                continue
            for col in range(grid.grid):
                xlo = tile_i[t] * grid.s + col
                sel = iny & (fx >= xlo) & (fx < xlo + 1) & (gene >= 0)
                if sel.any():
                    np.add.at(out[t, row * grid.grid + col], gene[sel], 1)
    return out


# ----------------------------------------------------------------------------- writers
def _codec() -> list[Any]:
    from zarr.codecs import BloscCodec

    # lz4 + byte shuffle: decodes several times faster than zstd; the loader reads these per batch
    return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]


def write_tokens_zarr(path: Path, pc: PatchCounts, pm: np.ndarray, grid: TileGrid, tile_i: np.ndarray,
                      tile_j: np.ndarray, genes: Sequence[str], sample: str, chunk_tiles: int = 64,
                      ) -> np.ndarray:
    """Write tokens.zarr tile-chunk by tile-chunk (bounded memory); returns tile_counts (N, G) uint32."""
    import zarr

    k = _kernels()
    G = len(genes)
    ti = np.asarray(tile_i, np.int64)
    tj = np.asarray(tile_j, np.int64)
    N = len(ti)
    nnz = k["tile_nnz"](ti, tj, grid.s, grid.grid, pm, pc.indptr)
    indptr = np.zeros(N + 1, np.int64)
    np.cumsum(nnz, out=indptr[1:])
    total = int(indptr[-1])
    cmax = int(pc.count.max()) if len(pc.count) else 0
    cdtype = np.uint16 if cmax <= np.iinfo(np.uint16).max else np.uint32
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.attrs.update({"genes": list(genes), "grid": grid.grid, "sample": sample, "n_tiles": N,
                    "count_dtype": np.dtype(cdtype).name})
    g.create_array("indptr", data=indptr, chunks=(max(1, min(N + 1, 1 << 20)),), compressors=_codec())
    ch = (max(1, min(total, TOKEN_CHUNK)),)
    a_tok = g.create_array("token", shape=(total,), chunks=ch, dtype="uint8", compressors=_codec(), fill_value=0)
    a_gene = g.create_array("gene", shape=(total,), chunks=ch, dtype="uint16", compressors=_codec(), fill_value=0)
    a_cnt = g.create_array("count", shape=(total,), chunks=ch, dtype=np.dtype(cdtype).name, compressors=_codec(),
                           fill_value=0)
    a_tc = g.create_array("tile_counts", shape=(N, G), chunks=(max(1, min(N, chunk_tiles)), max(1, G)), dtype="uint32",
                          compressors=_codec(), fill_value=0)
    from morphomol.data.chunks import ChunkWriter

    w_tok, w_gene, w_cnt = ChunkWriter(a_tok, ch[0]), ChunkWriter(a_gene, ch[0]), ChunkWriter(a_cnt, ch[0])
    w_tc = ChunkWriter(a_tc, max(1, min(N, chunk_tiles)))
    tile_counts = np.zeros((N, G), np.uint32)
    for t0 in range(0, N, chunk_tiles):
        t1 = min(N, t0 + chunk_tiles)
        m = int(indptr[t1] - indptr[t0])
        tok = np.empty(m, np.uint8)
        gen = np.empty(m, np.uint16)
        cnt = np.empty(m, np.uint32)
        tc = np.zeros((t1 - t0, max(1, G)), np.uint32)
        k["fill_tiles"](ti[t0:t1], tj[t0:t1], grid.s, grid.grid, pm, pc.indptr, pc.gene, pc.count, tok, gen, cnt, tc)
        w_tok.add(tok)
        w_gene.add(gen)
        w_cnt.add(cnt.astype(cdtype, copy=False))
        w_tc.add(tc[:, :G])
        tile_counts[t0:t1] = tc[:, :G]
    for w in (w_tok, w_gene, w_cnt, w_tc):
        w.flush()
    return tile_counts


def check_panel_genes(sample: str, genes: Sequence[str], panel: dict[str, Any] | None) -> None:
    """InputError naming the sample and the panel genes it lacks."""
    if not panel or panel.get("mode") == "hvg":
        return
    have = set(genes)
    for key in ("core", "addon"):
        missing = [g for g in panel.get(key) or [] if g not in have]
        if missing:
            raise InputError(
                f"sample {sample}: {len(missing)} {key} panel gene(s) not measured in this sample: "
                f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}",
                field=f"panel.{key}", expected=f"every {key} gene among the sample's {len(have)} genes",
            )


def tokens_sample(
    *, tiles: str | Path, tiles_store: str | Path, registration: str | Path, xenium_dir: str | Path,
    out_tokens: str | Path, out_units: str | Path, panel: dict[str, Any] | None = None, sample: str | None = None,
    patient: str | None = None, io: IOConfig | None = None, chunk_tiles: int = 64, buffer_size: int = 1 << 23,
    he_path: str | Path | None = None, he_mpp: float | None = None,
) -> None:
    """Per-sample rule: pool transcripts onto the tokens of the kept tiles; write tokens.zarr (the
    loader's store) and the unit table units.h5ad (tiles x genes counts, obs = tiles.parquet,
    ``obsm['spatial']`` = tile centres in µm; with ``he_path``: ``uns['spatial']``, the H&E in the µm
    frame). ``io``: qv filter and batch size (default qv >= 20)."""
    import zarr

    from morphomol.data.units import write_units
    from morphomol.geometry import check_regions, grid_from_attrs, region_matrices, um_to_patch_matrices
    from morphomol.io.xenium import XeniumBundle
    from morphomol.registration import Registration
    from morphomol.transcripts import sample_batches

    io = io or IOConfig(qv_min=20.0, batch_size=2_000_000)
    t0 = time.perf_counter()
    table = pd.read_parquet(tiles)
    attrs = dict(zarr.open_group(str(tiles_store), mode="r").attrs)
    sample = sample or attrs.get("sample") or json.loads(Path(registration).read_text()).get("sample")
    grid = grid_from_attrs(attrs)
    genes = list(attrs["genes"])
    check_panel_genes(sample, genes, panel)
    reg = Registration.load(registration)
    inv, _fwd = region_matrices(reg)
    M, has = um_to_patch_matrices(grid, inv)
    bundle = XeniumBundle(xenium_dir)
    ti = table["grid_i"].to_numpy(np.int64)
    tj = table["grid_j"].to_numpy(np.int64)
    pc, pm = pool_patches(sample_batches(bundle, reg, genes, batch_size=io.batch_size, qv_min=io.qv_min), grid, ti,
                          tj, M, len(genes), buffer_size=buffer_size,
                          check=lambda b: check_regions(b.region, has, sample))
    secs = time.perf_counter() - t0
    log.info("%s: pooled %d transcripts into %d patch-gene entries in %.1f s", sample, pc.n_transcripts,
             len(pc.gene), secs)
    with atomic_path(out_tokens) as tmp:
        tc = write_tokens_zarr(tmp, pc, pm, grid, ti, tj, genes, sample, chunk_tiles)
        got = tc.sum(axis=1, dtype=np.int64)
        want = table["n_transcripts"].to_numpy(np.int64)
        if not np.array_equal(got, want):
            bad = int(np.flatnonzero(got != want)[0])
            raise InputError(f"sample {sample}: tile {table['tile_id'].iloc[bad]} has {got[bad]} transcripts in the "
                             f"token pass but {want[bad]} in tiles.parquet (inputs changed between rules?)",
                             file=tiles, field="n_transcripts", expected="identical transcript counts")
        spatial = table[["x_um", "y_um"]].to_numpy(np.float64)
        image = None
        if he_path is not None:  # the H&E under the tiles (drawn as circles of the stride's size)
            from morphomol.registration.warp import spatial_image

            image = spatial_image(he_path, spatial_um=spatial, registration=reg, he_mpp=he_mpp, library_id=sample,
                                  spot_diameter_um=float(attrs.get("stride") or attrs.get("tile_px", 0))
                                  * float(attrs.get("mpp") or 1.0))
        write_units(out_units, table, tc, genes, spatial_um=spatial, unit="tile",
                    sample=sample, patient=patient, index_col="tile_id",
                    uns={"tile_px": attrs.get("tile_px"), "tile_mpp": attrs.get("mpp"), "he_mpp": attrs.get("he_mpp")},
                    spatial_image=image)
    log.info("%s: %d tiles written in %.1f s", sample, len(table), time.perf_counter() - t0)
