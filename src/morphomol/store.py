"""Readers over tiles.zarr / tokens.zarr and the training loader.

Speed: images are read as whole zarr chunks (``chunk_tiles`` tiles each), never tile by
tile. An epoch is planned up front from ``(seed, epoch)``: the partition's chunks are
shuffled, filled into a buffer of ``buffer_chunks`` chunks, the buffer's tiles shuffled
and cut into batches (remainder carried into the next buffer). The batches of one buffer
fill form a *unit*; DataLoader worker ``w`` of ``W`` handles units ``w, w+W, ...`` so every
chunk is decoded by one worker only. Zarr handles are opened lazily inside each worker
and kept (persistent workers). Chunks of the writers' plain layout (bytes [+ Blosc], no sharding,
local store) are read straight from their files and decoded into reused buffers
(:class:`_ChunkFiles`; zarr slicing otherwise); a batch is assembled by numba kernels with one
copy per tile; in DataLoader workers the batch tensors are allocated in shared memory, so handing
them to the trainer copies nothing. ``token_format="coo"`` is the fast path for GPU training
(:func:`densify_tokens` scatters on the device); dense tokens cost B*196*G_core*4 bytes a batch.
The set of batches of an epoch depends only on
``(seed, epoch, batch_size, buffer_chunks)``; their order also on ``num_workers``
(DataLoader round-robin over workers).

Batch (dict), B tiles:
  ``image``        uint8  (B, 224, 224, 3)  (normalisation is the model's job)
  ``tokens``       float32 (B, 196, G_core) raw counts       (token_format="dense")
  ``token_index``  int64 (nnz,) flat index into (B, 196, G_core), ``token_value`` float32 (nnz,)
                                                              (token_format="coo"; see :func:`densify_tokens`)
  ``tile_counts``  float32 (B, G_core) raw counts of the core genes over the tile
  ``targets``      float32 (B, G_addon) log1p of the add-on gene counts over the tile
  ``index``        int64 (B,) row in the sample's stores; ``tile_id`` list[str]
Inputs are raw counts: the model applies log1p (the paper pools, then log1p).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("store")

N_TOKENS = 196
_K: dict[str, Any] = {}


def _kernels() -> dict[str, Any]:
    """numba kernels of the collate step (compiled once per process, cached on disk)."""
    if not _K:
        import numba as nb

        @nb.njit(cache=True, nogil=True)
        def take_rows(src, off, pos, dst):  # type: ignore[no-untyped-def]
            # dst[pos[k]] = src[off[k]] for 2-D (rows, bytes) views: one copy per tile
            R = src.shape[1]
            for k in range(off.shape[0]):
                s = src[off[k]]
                d = dst[pos[k]]
                for j in range(R):
                    d[j] = s[j]

        @nb.njit(cache=True, nogil=True)
        def take_counts(tc, off, pos, core_idx, addon_idx, core, addon):  # type: ignore[no-untyped-def]
            for k in range(off.shape[0]):
                o, p = off[k], pos[k]
                for j in range(core_idx.shape[0]):
                    core[p, j] = tc[o, core_idx[j]]
                for j in range(addon_idx.shape[0]):
                    addon[p, j] = tc[o, addon_idx[j]]

        @nb.njit(cache=True, nogil=True)
        def gather_coo(ip, tk, gn, ct, off, pos, lut, Gc, flat, vals, w):  # type: ignore[no-untyped-def]
            # one pass over a chunk's token entries for the selected tiles -> flat COO
            for q in range(off.shape[0]):
                o = off[q]
                base = pos[q] * 196
                for e in range(ip[o], ip[o + 1]):
                    g = lut[gn[e]]
                    if g >= 0:
                        flat[w] = (base + tk[e]) * Gc + g
                        vals[w] = ct[e]
                        w += 1
            return w

        @nb.njit(cache=True, nogil=True)
        def gather_dense(ip, tk, gn, ct, off, pos, lut, Gc, out):  # type: ignore[no-untyped-def]
            # straight into the zeroed (B*196*Gc,) output; no intermediate COO
            for q in range(off.shape[0]):
                o = off[q]
                base = pos[q] * 196
                for e in range(ip[o], ip[o + 1]):
                    g = lut[gn[e]]
                    if g >= 0:
                        out[(base + tk[e]) * Gc + g] = ct[e]

        _K.update(take_rows=take_rows, take_counts=take_counts, gather_coo=gather_coo, gather_dense=gather_dense)
    return _K


def _alloc(shape: tuple[int, ...], dtype: Any, *, shared: bool, zero: bool = False) -> tuple[Any, np.ndarray]:
    """(tensor, numpy view of it). ``shared`` (DataLoader workers): the storage is created in
    shared memory, so handing the batch to the main process copies nothing (a private buffer
    would be copied into shared memory by torch's pickler). New shared memory is zero-filled."""
    torch = _torch()
    if shared:
        tdt = torch.from_numpy(np.empty(0, dtype)).dtype
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        t = torch.empty(0, dtype=tdt).set_(torch.UntypedStorage._new_shared(max(n, 1)), 0, shape)
        return t, t.numpy()
    a = np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
    return torch.from_numpy(a), a


class _ChunkFiles:
    """Whole-chunk reads of a zarr v3 array on a local store, decoded straight into a caller's
    buffer (no zarr event-loop round trip, no intermediate copy). Only for the plain layouts the
    writers produce (bytes codec, optionally one Blosc codec, no sharding, chunks spanning every
    axis but the first); :meth:`read` falls back to zarr slicing for anything else."""

    def __init__(self, arr: Any) -> None:
        self.arr = arr
        self.C = int(arr.chunks[0])
        self.n = int(arr.shape[0])
        self.row_shape = tuple(int(x) for x in arr.shape[1:])
        self.dtype = np.dtype(arr.dtype)
        self.base: Path | None = None
        self.blosc = False
        try:
            from zarr.storage import LocalStore

            meta = arr.metadata
            names = [type(c).__name__ for c in meta.codecs]
            if (meta.zarr_format == 3 and isinstance(arr.store, LocalStore)
                    and tuple(int(x) for x in arr.chunks[1:]) == self.row_shape
                    and names in (["BytesCodec"], ["BytesCodec", "BloscCodec"])
                    and (self.dtype.itemsize == 1 or meta.codecs[0].endian is None
                         or meta.codecs[0].endian.value == ("little" if np.little_endian else "big"))):
                self.blosc = len(names) == 2
                self.base = Path(arr.store.root) / arr.path
                self._key = meta.encode_chunk_key
                self.fill = meta.fill_value
        except Exception:  # any surprise: use zarr itself
            self.base = None

    def empty(self) -> np.ndarray:
        return np.empty((self.C, *self.row_shape), self.dtype)

    def _decode(self, c: int, out: np.ndarray) -> bool:
        """Whole chunk ``c`` into ``out`` (a full (C, ...) buffer); False: use zarr instead."""
        if self.base is None:
            return False
        p = self.base / self._key((c,) + (0,) * len(self.row_shape))
        try:
            with open(p, "rb") as f:
                if not self.blosc:
                    return f.readinto(memoryview(out).cast("B")) == out.nbytes
                data = f.read()
        except FileNotFoundError:  # never written: all fill value
            out[...] = self.fill
            return True
        from numcodecs import blosc

        # blosc header: bytes 4..8 = uncompressed size (little endian)
        if len(data) < 16 or int.from_bytes(data[4:8], "little") != out.nbytes:
            return False
        blosc.decompress(data, out)
        return True

    def read(self, c: int, out: np.ndarray) -> np.ndarray:
        """Rows of chunk ``c`` into ``out`` ((C, *row_shape)); returns ``out[:rows in chunk]``."""
        i0 = c * self.C
        m = min(self.C, self.n - i0)
        if not self._decode(c, out):
            out[:m] = self.arr[i0:i0 + m]
        return out[:m]

    def read_range(self, i0: int, i1: int) -> np.ndarray:
        """Rows [i0, i1) (chunks fully inside are decoded in place, edge chunks through a scratch buffer)."""
        out = np.empty((i1 - i0, *self.row_shape), self.dtype)
        if i1 <= i0:
            return out
        tmp = None
        for c in range(i0 // self.C, (i1 - 1) // self.C + 1):
            c0 = c * self.C
            lo, hi = max(i0, c0), min(i1, c0 + self.C)
            if lo == c0 and hi == c0 + self.C and self._decode(c, out[lo - i0:hi - i0]):
                continue
            if tmp is None:
                tmp = self.empty()
            if self._decode(c, tmp):
                out[lo - i0:hi - i0] = tmp[lo - c0:hi - c0]
            else:
                out[lo - i0:hi - i0] = self.arr[lo:hi]
        return out


# ----------------------------------------------------------------------------- per sample
class SampleStore:
    """Lazy reader of one sample's tiles.zarr + tokens.zarr (opened on first use)."""

    def __init__(self, sample_dir: str | Path) -> None:
        self.dir = Path(sample_dir)
        self._img = None
        self._img_chunks: _ChunkFiles | None = None
        self._tok_readers: dict[str, _ChunkFiles] = {}
        self._tok: Any = None
        self._indptr: np.ndarray | None = None
        self._genes: list[str] | None = None

    def _open_tokens(self) -> Any:
        if self._tok is None:
            import zarr

            p = self.dir / "tokens.zarr"
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

            p = self.dir / "tiles.zarr"
            if not p.exists():
                raise InputError("tile store missing", file=p, expected="output of the tile rule")
            self._img = zarr.open_group(str(p), mode="r")["images"]
        return self._img

    @property
    def chunk_tiles(self) -> int:
        return int(self.images.chunks[0])

    @property
    def image_chunks(self) -> _ChunkFiles:
        """Whole-chunk reader of ``images`` (see :class:`_ChunkFiles`)."""
        if self._img_chunks is None:
            self._img_chunks = _ChunkFiles(self.images)
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

    def _tok_reader(self, name: str) -> _ChunkFiles:
        if name not in self._tok_readers:
            self._tok_readers[name] = _ChunkFiles(self._open_tokens()[name])
        return self._tok_readers[name]

    def read_tokens(self, i0: int, i1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(local indptr (n+1,), token uint8, gene uint16, count) for tiles [i0, i1)."""
        ip = self.indptr
        a, b = int(ip[i0]), int(ip[i1])
        return (ip[i0:i1 + 1] - a, self._tok_reader("token").read_range(a, b),
                self._tok_reader("gene").read_range(a, b), self._tok_reader("count").read_range(a, b))

    def read_tile_counts(self, i0: int | None = None, i1: int | None = None) -> np.ndarray:
        r = self._tok_reader("tile_counts")
        a, b, _ = slice(i0, i1).indices(r.n)
        return r.read_range(a, max(a, b))

    def gene_index(self, genes: Sequence[str]) -> np.ndarray:
        pos = {g: i for i, g in enumerate(self.genes)}
        miss = [g for g in genes if g not in pos]
        if miss:
            raise InputError(f"{len(miss)} panel gene(s) not in this sample: {', '.join(miss[:10])}",
                             file=self.dir / "tokens.zarr", field="genes")
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


# ----------------------------------------------------------------------------- cohort level
def load_panel(cohort_dir: str | Path, fold: int) -> dict[str, Any]:
    p = Path(cohort_dir) / "panels" / f"fold{fold}.json"
    if not p.exists():
        raise InputError("panel file missing", file=p, expected="output of the panel rule")
    return json.loads(p.read_text())


def load_split(cohort_dir: str | Path, fold: int) -> pd.DataFrame:
    p = Path(cohort_dir) / "splits" / f"fold{fold}.parquet"
    if not p.exists():
        raise InputError("split file missing", file=p, expected="output of the splits rule")
    return pd.read_parquet(p)


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


def load_tile_arrays(cohort_dir: str | Path, fold: int, panel: dict[str, Any] | None = None) -> TileArrays:
    """All tiles of the fold's split in memory (tile-level core counts + log1p targets)."""
    cohort_dir = Path(cohort_dir)
    panel = panel or load_panel(cohort_dir, fold)
    split = load_split(cohort_dir, fold)
    core, tgt = [], []
    order = []
    for s, df in split.groupby("sample_id", sort=False):
        st = SampleStore(cohort_dir / "samples" / str(s))
        tc = st.read_tile_counts()
        idx = df["index"].to_numpy(np.int64)
        core.append(tc[idx][:, st.gene_index(panel["core"])].astype(np.float32))
        tgt.append(np.log1p(tc[idx][:, st.gene_index(panel["addon"])].astype(np.float32)))
        order.append(df)
    d = pd.concat(order)
    return TileArrays(d["tile_id"].to_numpy(), d["sample_id"].to_numpy(), d["partition"].to_numpy(),
                      np.concatenate(core), np.concatenate(tgt), list(panel["core"]), list(panel["addon"]))


# ----------------------------------------------------------------------------- epoch plan
def plan_epoch(chunks: Sequence[tuple[int, int, np.ndarray]], batch_size: int, *, shuffle: bool, seed: int,
               epoch: int, buffer_chunks: int = 8, drop_last: bool = False) -> list[list[np.ndarray]]:
    """Units of batches. ``chunks``: (sample_idx, chunk_idx, tile indices). A batch is an
    (n, 2) int64 array of (sample_idx, tile index)."""
    rng = np.random.default_rng([int(seed), int(epoch)])
    order = rng.permutation(len(chunks)) if shuffle else np.arange(len(chunks))
    units: list[list[np.ndarray]] = []
    carry = np.empty((0, 2), np.int64)
    for u0 in range(0, len(order), buffer_chunks):
        parts = [carry] + [np.stack([np.full(len(chunks[c][2]), chunks[c][0]), chunks[c][2]], axis=1)
                           for c in order[u0:u0 + buffer_chunks]]
        buf = np.concatenate(parts).astype(np.int64)
        if shuffle:
            buf = buf[rng.permutation(len(buf))]
        nfull = len(buf) // batch_size
        units.append([buf[b * batch_size:(b + 1) * batch_size] for b in range(nfull)])
        carry = buf[nfull * batch_size:]
    if len(carry) and not drop_last:
        if units:
            units[-1].append(carry)
        else:
            units.append([carry])
    return [u for u in units if u]


def _torch():
    import torch

    return torch


class TileStream:
    """Iterable dataset of collated batches (see module doc). Use through :func:`make_loader`."""

    def __init__(self, cohort_dir: str | Path, fold: int, partition: str | Sequence[str], panel: dict[str, Any] | None = None,
                 *, batch_size: int = 256, shuffle: bool = True, seed: int = 0, buffer_chunks: int = 8,
                 drop_last: bool = False, token_format: str = "dense", images: bool = True, tokens: bool = True,
                 grid: int = 14) -> None:
        torch = _torch()
        self.cohort_dir = Path(cohort_dir)
        self.panel = panel or load_panel(self.cohort_dir, fold)
        split = load_split(self.cohort_dir, fold)
        parts = [partition] if isinstance(partition, str) else list(partition)
        split = split[split["partition"].isin(parts)]
        if split.empty:
            raise InputError(f"fold {fold} has no tiles in partition(s) {parts}", field="partition")
        if token_format not in ("dense", "coo"):
            raise ValueError("token_format must be 'dense' or 'coo'")
        self.samples = list(dict.fromkeys(split["sample_id"].astype(str)))
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self.buffer_chunks, self.drop_last, self.token_format = int(buffer_chunks), bool(drop_last), token_format
        self.want_images, self.want_tokens, self.grid = images, tokens, grid
        self.core, self.addon = list(self.panel["core"]), list(self.panel["addon"])
        self._stores: dict[int, SampleStore] | None = None
        self._maps: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._pool: dict[int, list[np.ndarray]] = {}  # free image-chunk buffers per sample
        # chunk layout (opened once here, in the parent, only for the chunk size)
        self.chunks: list[tuple[int, int, np.ndarray]] = []
        self.chunk_size = np.zeros(len(self.samples), np.int64)
        self._id_base = np.zeros(len(self.samples), np.int64)  # tile_id of (s, i) = _ids[_id_base[s] + i]
        id_parts = []
        for si, s in enumerate(self.samples):
            df = split[split["sample_id"].astype(str) == s]
            raw = df["index"].to_numpy(np.int64)
            idx = np.sort(raw)
            ids = np.empty(int(idx[-1]) + 1, object)
            ids[raw] = df["tile_id"].astype(str).to_numpy(object)
            self._id_base[si] = sum(len(x) for x in id_parts)
            id_parts.append(ids)
            C = SampleStore(self.cohort_dir / "samples" / s).chunk_tiles
            self.chunk_size[si] = C
            ck = idx // C
            for c in np.unique(ck):
                self.chunks.append((si, int(c), idx[ck == c]))
        self._ids = np.concatenate(id_parts)
        self.n_tiles = int(sum(len(c[2]) for c in self.chunks))
        self._len: int | None = None
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    # epoch handling (shared with worker processes through shared memory)
    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def plan(self, epoch: int | None = None) -> list[list[np.ndarray]]:
        return plan_epoch(self.chunks, self.batch_size, shuffle=self.shuffle, seed=self.seed,
                          epoch=self.epoch if epoch is None else epoch, buffer_chunks=self.buffer_chunks,
                          drop_last=self.drop_last)

    def __len__(self) -> int:
        if self._len is None:  # the same for every epoch: full batches + the final remainder
            self._len = sum(len(u) for u in self.plan(0))
        return self._len

    def _store(self, si: int) -> SampleStore:
        if self._stores is None:
            self._stores = {}
        if si not in self._stores:
            st = SampleStore(self.cohort_dir / "samples" / self.samples[si])
            self._stores[si] = st
            core_idx, addon_idx = st.gene_index(self.core), st.gene_index(self.addon)
            lut = np.full(len(st.genes), -1, np.int64)
            lut[core_idx] = np.arange(len(core_idx))
            self._maps[si] = (core_idx, addon_idx, lut)
        return self._stores[si]

    def _read_chunk(self, si: int, c: int) -> dict[str, Any]:
        st = self._store(si)
        C = st.chunk_tiles
        i0, i1 = c * C, min((c + 1) * C, st.n_tiles)
        d: dict[str, Any] = {"si": si, "i0": i0, "tc": st.read_tile_counts(i0, i1)}
        if self.want_images:
            rd = st.image_chunks
            pool = self._pool.setdefault(si, [])
            d["buf"] = pool.pop() if pool else rd.empty()
            d["img"] = rd.read(c, d["buf"]).reshape(i1 - i0, -1)
        if self.want_tokens:
            d["tok"] = st.read_tokens(i0, i1)
        return d

    def _release(self, ch: dict[str, Any]) -> None:
        if "buf" in ch:
            pool = self._pool.setdefault(ch["si"], [])
            if len(pool) < 2 * self.buffer_chunks + 2:
                pool.append(ch.pop("buf"))

    def _collate(self, batch: np.ndarray, cur: dict[tuple[int, int], dict[str, Any]],
                 prev: dict[tuple[int, int], dict[str, Any]], shared: bool = False) -> dict[str, Any]:
        torch = _torch()
        k = _kernels()
        B = len(batch)
        Gc, Ga = len(self.core), len(self.addon)
        si_all, idx_all = batch[:, 0], batch[:, 1]
        ck_all = idx_all // self.chunk_size[si_all]
        # group the batch's tiles by chunk (positions stay in batch order inside a group)
        key = si_all * (1 << 40) + ck_all
        order = np.argsort(key, kind="stable")
        cuts = np.flatnonzero(np.diff(key[order])) + 1
        groups = []
        for g in np.split(order, cuts):
            kk = (int(si_all[g[0]]), int(ck_all[g[0]]))
            ch = cur.get(kk) or prev.get(kk)
            if ch is None:
                ch = cur[kk] = self._read_chunk(*kk)
            elif kk not in cur:
                cur[kk] = ch  # still needed by this unit: keep it past the next release
            groups.append((ch, (idx_all[g] - ch["i0"]).astype(np.int64), g.astype(np.int64)))
        out: dict[str, Any] = {}
        if self.want_images:
            t_img, img = _alloc((B, *groups[0][0]["buf"].shape[1:]), np.uint8, shared=shared)
            img2 = img.reshape(B, -1)
            for ch, off, pos in groups:
                k["take_rows"](ch["img"], off, pos, img2)
            out["image"] = t_img
        t_core, tc_core = _alloc((B, Gc), np.float32, shared=shared)
        t_tgt, tgt = _alloc((B, Ga), np.float32, shared=shared)
        for ch, off, pos in groups:
            core_idx, addon_idx, _ = self._maps[ch["si"]]
            k["take_counts"](ch["tc"], off, pos, core_idx, addon_idx, tc_core, tgt)
        np.log1p(tgt, out=tgt)
        if self.want_tokens:
            if self.token_format == "dense":
                t_tok, dense = _alloc((B * N_TOKENS * Gc,), np.float32, shared=shared, zero=True)
                for ch, off, pos in groups:
                    ip, tk, gn, ct = ch["tok"]
                    k["gather_dense"](ip, tk, gn, ct, off, pos, self._maps[ch["si"]][2], Gc, dense)
                out["tokens"] = t_tok.view(B, N_TOKENS, Gc)
            else:
                tot = sum(int((ch["tok"][0][off + 1] - ch["tok"][0][off]).sum()) for ch, off, pos in groups)
                t_flat, flat = _alloc((tot,), np.int64, shared=shared)
                t_vals, vals = _alloc((tot,), np.float32, shared=shared)
                w = 0
                for ch, off, pos in groups:
                    ip, tk, gn, ct = ch["tok"]
                    w = k["gather_coo"](ip, tk, gn, ct, off, pos, self._maps[ch["si"]][2], Gc, flat, vals, w)
                out["token_index"] = t_flat[:w]
                out["token_value"] = t_vals[:w]
                out["token_shape"] = (B, N_TOKENS, Gc)
        out["tile_counts"] = t_core
        out["targets"] = t_tgt
        out["index"] = torch.from_numpy(idx_all.copy())
        out["tile_id"] = self._ids[self._id_base[si_all] + idx_all].tolist()
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        torch = _torch()
        info = torch.utils.data.get_worker_info()
        w, W = (0, 1) if info is None else (info.id, info.num_workers)
        units = self.plan()
        prev: dict[tuple[int, int], dict[str, Any]] = {}
        for u in units[w::W]:
            cur: dict[tuple[int, int], dict[str, Any]] = {}
            for batch in u:
                yield self._collate(batch, cur, prev, shared=info is not None)
            for kk, ch in prev.items():  # chunks of two units ago: buffers back to the pool
                if kk not in cur:
                    self._release(ch)
            prev = cur  # keep the last unit's chunks (carried tiles come from them)


def densify_tokens(batch: dict[str, Any], device: Any = None) -> Any:
    """(B, 196, G_core) float32 tensor from a batch (dense passthrough or COO scatter on ``device``)."""
    torch = _torch()
    if "tokens" in batch:
        return batch["tokens"].to(device) if device is not None else batch["tokens"]
    B, T, G = batch["token_shape"]
    out = torch.zeros(B * T * G, dtype=torch.float32, device=device)
    out[batch["token_index"].to(device)] = batch["token_value"].to(device)
    return out.view(B, T, G)


class TileLoader:
    """DataLoader wrapper: ``len``, ``set_epoch`` and auto-advancing epochs (0, 1, ... per iteration
    unless :meth:`set_epoch` was called before the iteration)."""

    def __init__(self, dataset: TileStream, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int = 4) -> None:
        torch = _torch()

        class _DS(torch.utils.data.IterableDataset):  # type: ignore[misc]
            def __init__(self, inner: TileStream) -> None:
                self.inner = inner

            def __iter__(self):  # type: ignore[no-untyped-def]
                return iter(self.inner)

        self.dataset = dataset
        kw: dict[str, Any] = {}
        if num_workers > 0:
            kw.update(persistent_workers=True, prefetch_factor=prefetch_factor)
        self.loader = torch.utils.data.DataLoader(_DS(dataset), batch_size=None, num_workers=num_workers,
                                                  pin_memory=pin_memory, **kw)
        self._next_epoch = 0
        self._explicit = False

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self._next_epoch = epoch
        self._explicit = True

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self._explicit:
            self.dataset.set_epoch(self._next_epoch)
        self._explicit = False
        self._next_epoch = self.dataset.epoch + 1
        return iter(self.loader)


def make_loader(cohort_dir: str | Path, fold: int, partition: str | Sequence[str], panel: dict[str, Any] | None = None,
                *, batch_size: int = 256, shuffle: bool = True, seed: int = 0, num_workers: int = 0,
                buffer_chunks: int = 8, drop_last: bool = False, token_format: str = "dense", images: bool = True,
                tokens: bool = True, pin_memory: bool = False) -> TileLoader:
    """Loader over ``results/{cohort}`` for one fold and partition ("fit", "val", "test" or a list).

    ``panel`` defaults to panels/fold{fold}.json. Shuffle is deterministic in (seed, epoch).
    """
    ds = TileStream(cohort_dir, fold, partition, panel, batch_size=batch_size, shuffle=shuffle, seed=seed,
                    buffer_chunks=buffer_chunks, drop_last=drop_last, token_format=token_format, images=images,
                    tokens=tokens)
    return TileLoader(ds, num_workers=num_workers, pin_memory=pin_memory)
