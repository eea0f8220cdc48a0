"""Readers over tiles.zarr / tokens.zarr and the training loader.

Speed: images are read as whole zarr chunks (``chunk_tiles`` tiles each), never tile by
tile. An epoch is planned up front from ``(seed, epoch)``: the partition's chunks are
shuffled, filled into a buffer of ``buffer_chunks`` chunks, the buffer's tiles shuffled
and cut into batches (remainder carried into the next buffer). The batches of one buffer
fill form a *unit*; DataLoader worker ``w`` of ``W`` handles units ``w, w+W, ...`` so every
chunk is decoded by one worker only. Zarr handles are opened lazily inside each worker
and kept (persistent workers). The set of batches of an epoch depends only on
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
from morphomol.logs import get_logger

log = get_logger("store")

N_TOKENS = 196
_GATHER: list = []


def _gather_kernel():
    """numba: one pass over a chunk's token entries for the selected tiles -> flat COO."""
    if not _GATHER:
        import numba as nb

        @nb.njit(cache=True, nogil=True)
        def gather(ip, tk, gn, ct, off, pos, lut, Gc, flat, vals, w):
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
        def scatter(flat, vals, n, out):
            for i in range(n):
                out[flat[i]] = vals[i]

        _GATHER.extend([gather, scatter])
    return _GATHER


# ----------------------------------------------------------------------------- per sample
class SampleStore:
    """Lazy reader of one sample's tiles.zarr + tokens.zarr (opened on first use)."""

    def __init__(self, sample_dir: str | Path) -> None:
        self.dir = Path(sample_dir)
        self._img = None
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

    def read_tokens(self, i0: int, i1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(local indptr (n+1,), token uint8, gene uint16, count) for tiles [i0, i1)."""
        g = self._open_tokens()
        ip = self.indptr
        a, b = int(ip[i0]), int(ip[i1])
        return ip[i0:i1 + 1] - a, np.asarray(g["token"][a:b]), np.asarray(g["gene"][a:b]), np.asarray(g["count"][a:b])

    def read_tile_counts(self, i0: int | None = None, i1: int | None = None) -> np.ndarray:
        g = self._open_tokens()
        return np.asarray(g["tile_counts"][slice(i0, i1)])

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
        # chunk layout (opened once here, in the parent, only for the chunk size)
        self.chunks: list[tuple[int, int, np.ndarray]] = []
        self.tile_ids: dict[int, dict[int, str]] = {}
        for si, s in enumerate(self.samples):
            df = split[split["sample_id"].astype(str) == s]
            idx = np.sort(df["index"].to_numpy(np.int64))
            self.tile_ids[si] = dict(zip(df["index"].to_numpy(np.int64).tolist(), df["tile_id"].astype(str), strict=True))
            C = SampleStore(self.cohort_dir / "samples" / s).chunk_tiles
            ck = idx // C
            for c in np.unique(ck):
                self.chunks.append((si, int(c), idx[ck == c]))
        self.n_tiles = int(sum(len(c[2]) for c in self.chunks))
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
        return sum(len(u) for u in self.plan(0))

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
        d: dict[str, Any] = {"i0": i0, "tc": st.read_tile_counts(i0, i1)}
        if self.want_images:
            d["img"] = st.read_images(i0, i1)
        if self.want_tokens:
            d["tok"] = st.read_tokens(i0, i1)
        return d

    def _collate(self, batch: np.ndarray, cache: dict[tuple[int, int], dict[str, Any]]) -> dict[str, Any]:
        torch = _torch()
        B = len(batch)
        Gc, Ga = len(self.core), len(self.addon)
        out: dict[str, Any] = {}
        img = np.empty((B, 224, 224, 3), np.uint8) if self.want_images else None
        tc_core = np.empty((B, Gc), np.float32)
        tgt = np.empty((B, Ga), np.float32)
        flat_parts, val_parts = [], []
        gather, scatter = _gather_kernel() if self.want_tokens else (None, None)
        tile_ids: list[str] = [""] * B
        for si in np.unique(batch[:, 0]):
            sel_s = np.flatnonzero(batch[:, 0] == si)
            st = self._store(int(si))
            C = st.chunk_tiles
            core_idx, addon_idx, lut = self._maps[int(si)]
            ids = self.tile_ids[int(si)]
            idx_s = batch[sel_s, 1]
            for c in np.unique(idx_s // C):
                key = (int(si), int(c))
                if key not in cache:
                    cache[key] = self._read_chunk(int(si), int(c))
                ch = cache[key]
                m = idx_s // C == c
                pos = sel_s[m]
                off = idx_s[m] - ch["i0"]
                if img is not None:
                    img[pos] = ch["img"][off]
                tc = ch["tc"][off]
                tc_core[pos] = tc[:, core_idx]
                tgt[pos] = np.log1p(tc[:, addon_idx].astype(np.float32))
                for p, i in zip(pos.tolist(), idx_s[m].tolist(), strict=True):
                    tile_ids[p] = ids[i]
                if self.want_tokens:
                    ip, tk, gn, ct = ch["tok"]
                    tot = int((ip[off + 1] - ip[off]).sum())
                    if tot:
                        flat = np.empty(tot, np.int64)
                        vals = np.empty(tot, np.float32)
                        k = gather(ip, tk, gn, ct, off.astype(np.int64), pos.astype(np.int64), lut, Gc, flat, vals, 0)
                        flat_parts.append(flat[:k])
                        val_parts.append(vals[:k])
        if img is not None:
            out["image"] = torch.from_numpy(img)
        if self.want_tokens:
            flat = np.concatenate(flat_parts) if flat_parts else np.empty(0, np.int64)
            vals = np.concatenate(val_parts) if val_parts else np.empty(0, np.float32)
            if self.token_format == "dense":
                dense = np.zeros(B * N_TOKENS * Gc, np.float32)
                scatter(flat, vals, len(flat), dense)
                out["tokens"] = torch.from_numpy(dense.reshape(B, N_TOKENS, Gc))
            else:
                out["token_index"] = torch.from_numpy(flat)
                out["token_value"] = torch.from_numpy(vals)
                out["token_shape"] = (B, N_TOKENS, Gc)
        out["tile_counts"] = torch.from_numpy(tc_core)
        out["targets"] = torch.from_numpy(tgt)
        out["index"] = torch.from_numpy(batch[:, 1].copy())
        out["tile_id"] = tile_ids
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        torch = _torch()
        info = torch.utils.data.get_worker_info()
        w, W = (0, 1) if info is None else (info.id, info.num_workers)
        units = self.plan()
        cache: dict[tuple[int, int], dict[str, Any]] = {}
        for u in units[w::W]:
            new: dict[tuple[int, int], dict[str, Any]] = {}
            for batch in u:
                yield self._collate(batch, new if not cache else _Chained(new, cache))
            cache = new  # keep the last unit's chunks (carried tiles come from them)


class _Chained(dict):  # type: ignore[type-arg]
    """Lookup in ``new`` then ``old``; inserts go to ``new``."""

    def __init__(self, new: dict, old: dict) -> None:  # type: ignore[type-arg]
        super().__init__()
        self.new, self.old = new, old

    def __contains__(self, k: object) -> bool:
        return k in self.new or k in self.old

    def __getitem__(self, k: Any) -> Any:
        return self.new[k] if k in self.new else self.old[k]

    def __setitem__(self, k: Any, v: Any) -> None:
        self.new[k] = v


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
