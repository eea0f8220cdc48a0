"""Per-sample image stores (``images.zarr``) and token stores (``tokens.zarr``): readers.

``images.zarr``: array ``images`` (N, 224, 224, 3) uint8, chunks of ``chunk_tiles`` tiles.
``tokens.zarr``: sparse CSR over tiles — ``indptr`` (N+1,), ``token`` (nnz,) uint8 in [0, 196),
``gene`` (nnz,) uint16, ``count`` (nnz,); ``tile_counts`` (N, G) uint32 dense; attrs ``genes``.
Row ``i`` of both is row ``i`` of the sample's ``tiles.parquet`` and unit table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.data.chunks import ChunkReader
from morphomol.errors import InputError


@dataclass(frozen=True)
class StorePaths:
    """The stores of one sample a loader reads: ``tokens`` always, ``tiles`` (images) when images are used."""

    tokens: Path
    tiles: Path | None = None

    @classmethod
    def of(cls, tokens: str | Path, tiles: str | Path | None = None) -> StorePaths:
        return cls(Path(tokens), Path(tiles) if tiles is not None else None)


class SampleStore:
    """Lazy reader of one sample's tile image store and token store (opened on first use)."""

    def __init__(self, paths: StorePaths) -> None:
        self.paths = paths
        self._img = None
        self._img_chunks: ChunkReader | None = None
        self._tok_readers: dict[str, ChunkReader] = {}
        self._tok: Any = None
        self._indptr: np.ndarray | None = None
        self._genes: list[str] | None = None

    def _open_tokens(self) -> Any:
        if self._tok is None:
            import zarr

            p = self.paths.tokens
            if not p.exists():
                raise InputError("token store missing", file=p, expected="output of the tokens rule")
            self._tok = zarr.open_group(str(p), mode="r")
            self._genes = list(self._tok.attrs["genes"])
            self._indptr = np.asarray(self._tok["indptr"][:], np.int64)
        return self._tok

    @property
    def images(self) -> Any:
        if self._img is None:
            import zarr

            p = self.paths.tiles
            if p is None:
                raise InputError("no tile image store given for this sample", field="tiles",
                                 expected="the images.zarr of the sample")
            if not p.exists():
                raise InputError("tile store missing", file=p, expected="output of the tile rule")
            self._img = zarr.open_group(str(p), mode="r")["images"]
        return self._img

    @property
    def chunk_tiles(self) -> int:
        """Tiles per chunk: of the image store when one is given, else of ``tile_counts`` (the writers
        use the same ``tiling.chunk_tiles`` for both, so batches group tiles identically)."""
        if self.paths.tiles is not None:
            return int(self.images.chunks[0])
        return int(self._tok_reader("tile_counts").C)

    @property
    def image_chunks(self) -> ChunkReader:
        """Whole-chunk reader of ``images`` (see :class:`ChunkReader`)."""
        if self._img_chunks is None:
            self._img_chunks = ChunkReader(self.images)
        return self._img_chunks

    @property
    def genes(self) -> list[str]:
        self._open_tokens()
        assert self._genes is not None
        return self._genes

    @property
    def indptr(self) -> np.ndarray:
        self._open_tokens()
        assert self._indptr is not None
        return self._indptr

    @property
    def n_tiles(self) -> int:
        return len(self.indptr) - 1

    def read_images(self, i0: int, i1: int) -> np.ndarray:
        return np.asarray(self.images[i0:i1])

    def _tok_reader(self, name: str) -> ChunkReader:
        if name not in self._tok_readers:
            self._tok_readers[name] = ChunkReader(self._open_tokens()[name])
        return self._tok_readers[name]

    def read_tokens(self, i0: int, i1: int, bufs: dict[str, np.ndarray] | None = None,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(local indptr (n+1,), token uint8, gene uint16, count) for tiles [i0, i1). ``bufs``
        (reused buffers, loader): ``token`` / ``gene`` / ``count`` arrays are read into them,
        replaced by larger ones when too small."""
        ip = self.indptr
        a, b = int(ip[i0]), int(ip[i1])
        arrays = []
        for name in ("token", "gene", "count"):
            r = self._tok_reader(name)
            if bufs is None:
                arrays.append(r.read_range(a, b))
                continue
            buf = bufs.get(name)
            if buf is None or len(buf) < b - a or buf.dtype != r.dtype:
                buf = bufs[name] = np.empty(max(b - a, int(1.25 * (b - a))), r.dtype)
            arrays.append(r.read_range(a, b, out=buf))
        return (ip[i0:i1 + 1] - a, *arrays)

    def read_tile_counts(self, i0: int | None = None, i1: int | None = None) -> np.ndarray:
        r = self._tok_reader("tile_counts")
        a, b, _ = slice(i0, i1).indices(r.n)
        return r.read_range(a, max(a, b))

    def gene_index(self, genes: Sequence[str]) -> np.ndarray:
        pos = {g: i for i, g in enumerate(self.genes)}
        miss = [g for g in genes if g not in pos]
        if miss:
            raise InputError(f"{len(miss)} panel gene(s) not in this sample: {', '.join(miss[:10])}",
                             file=self.paths.tokens, field="genes")
        return np.array([pos[g] for g in genes], np.int64)



def tokens_to_dense(indptr: np.ndarray, token: np.ndarray, gene: np.ndarray, count: np.ndarray,
                    genes_idx: np.ndarray, n_genes_sample: int, grid: int = 14) -> np.ndarray:
    """Dense (n, grid*grid, len(genes_idx)) float32 token counts of the selected genes."""
    lut = np.full(n_genes_sample, -1, np.int64)
    lut[genes_idx] = np.arange(len(genes_idx))
    n = len(indptr) - 1
    out = np.zeros((n, grid * grid, len(genes_idx)), np.float32)
    tile = np.repeat(np.arange(n), np.diff(indptr))
    gg = lut[gene]
    ok = gg >= 0
    out[tile[ok], token[ok].astype(np.int64), gg[ok]] = count[ok]
    return out


@dataclass
class TileArrays:
    """Tile-level arrays for every tile of a fold (no images): core counts and log1p targets."""

    tile_id: np.ndarray
    sample_id: np.ndarray
    partition: np.ndarray
    core: np.ndarray  # (N, G_core) float32 raw counts
    targets: np.ndarray  # (N, G_addon) float32 log1p counts
    core_genes: list[str]
    addon_genes: list[str]

    def subset(self, partition: str) -> TileArrays:
        m = self.partition == partition
        return TileArrays(self.tile_id[m], self.sample_id[m], self.partition[m], self.core[m], self.targets[m],
                          self.core_genes, self.addon_genes)


def load_tile_arrays(split: pd.DataFrame, panel: Mapping[str, Any], stores: Mapping[str, StorePaths]) -> TileArrays:
    """All tiles of a split in memory (tile-level core counts + log1p targets, from the token stores)."""
    core, tgt = [], []
    order = []
    for s, df in split.groupby("sample_id", sort=False):
        st = SampleStore(stores[str(s)])
        tc = st.read_tile_counts()
        idx = df["index"].to_numpy(np.int64)
        core.append(tc[idx][:, st.gene_index(panel["core"])].astype(np.float32))
        tgt.append(np.log1p(tc[idx][:, st.gene_index(panel["addon"])].astype(np.float32)))
        order.append(df)
    d = pd.concat(order)
    return TileArrays(d["tile_id"].to_numpy(), d["sample_id"].to_numpy(), d["partition"].to_numpy(),
                      np.concatenate(core), np.concatenate(tgt), list(panel["core"]), list(panel["addon"]))




def token_store_unit_ids(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(unit ids, store rows) of a sample's ``tokens.zarr``: its ``n_tiles`` rows named by the tile-id contract
    (:func:`morphomol.tiling.tile_ids` with the store's ``sample`` attribute); reads only attributes / indptr."""
    from morphomol.data.features import open_zarr_group
    from morphomol.tiling import tile_ids

    p = Path(path)
    if not p.exists():
        raise InputError("token store not found", file=p, expected="tokens.zarr written by the tokens rule")
    g = open_zarr_group(p)
    sample = g.attrs.get("sample")
    if not sample:
        raise InputError("token store has no 'sample' attribute", file=p, field="sample",
                         expected="tokens.zarr written by the tokens rule")
    n = g.attrs.get("n_tiles")
    n = int(n) if n is not None else int(g["indptr"].shape[0]) - 1
    return np.asarray(tile_ids(str(sample), n)), np.arange(n, dtype=np.int64)
