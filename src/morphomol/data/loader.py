"""The training loader over the tile image and token stores of a fold's samples.

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

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.data.folds import read_split
from morphomol.data.stores import SampleStore, StorePaths
from morphomol.errors import InputError
from morphomol.util.logs import get_logger
from morphomol.util.numba import njit_kernels, numba_module

log = get_logger("data.loader")

N_TOKENS = 196


def _kernels() -> dict[str, Any]:
    """numba kernels of the collate step (compiled once per process, cached on disk)."""
    return njit_kernels("data.loader", _build_kernels)


def _build_kernels() -> dict[str, Any]:
    nb = numba_module()

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

    return {"take_rows": take_rows, "take_counts": take_counts, "gather_coo": gather_coo, "gather_dense": gather_dense}


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

    def __init__(self, split: pd.DataFrame, panel: Mapping[str, Any], stores: Mapping[str, StorePaths],
                 partition: str | Sequence[str], *, batch_size: int = 256, shuffle: bool = True, seed: int = 0,
                 buffer_chunks: int = 8, drop_last: bool = False, token_format: str = "dense", images: bool = True,
                 tokens: bool = True, grid: int = 14) -> None:
        torch = _torch()
        self.panel = {"core": list(panel["core"]), "addon": list(panel["addon"])}
        parts = [partition] if isinstance(partition, str) else list(partition)
        split = split[split["partition"].isin(parts)]
        if split.empty:
            raise InputError(f"the split has no tiles in partition(s) {parts}", field="partition")
        missing = sorted(set(split["sample_id"].astype(str)) - set(stores))
        if missing:
            raise InputError(f"no stores given for sample(s) {missing}", field="sample_id",
                             expected="the tile/token stores of every sample of the split")
        self.stores = {str(k): v for k, v in stores.items()}
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
            C = SampleStore(self.stores[s]).chunk_tiles
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
            st = SampleStore(self.stores[self.samples[si]])
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


def make_loader(split: pd.DataFrame | str | Path, panel: Mapping[str, Any], stores: Mapping[str, StorePaths],
                partition: str | Sequence[str], *, batch_size: int = 256, shuffle: bool = True, seed: int = 0,
                num_workers: int = 0, buffer_chunks: int = 8, drop_last: bool = False, token_format: str = "dense",
                images: bool = True, tokens: bool = True, pin_memory: bool = False) -> TileLoader:
    """Loader over one partition ("fit", "val", "test" or a list) of a split (table or
    ``splits/fold{k}.parquet``), reading the given per-sample stores. Shuffle is deterministic in
    (seed, epoch)."""
    if not isinstance(split, pd.DataFrame):
        split = read_split(split)
    ds = TileStream(split, panel, stores, partition, batch_size=batch_size, shuffle=shuffle, seed=seed,
                    buffer_chunks=buffer_chunks, drop_last=drop_last, token_format=token_format, images=images,
                    tokens=tokens)
    return TileLoader(ds, num_workers=num_workers, pin_memory=pin_memory)
