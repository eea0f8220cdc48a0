"""Batch assembly of the training loader (:mod:`morphomol.data.loader`): the numba kernels, the
chunk-buffer pool and :class:`ChunkDecoder`, the decode state of one thread or process.

A batch's tiles are grouped by chunk; a chunk is decoded once into a reused buffer and kept while
its unit (one shuffle-buffer fill) needs it; every tile is copied once into the batch by the
kernels (images: one row copy; tile counts and log1p targets gathered by gene; tokens as flat COO
entries, into a dense buffer, or into a reused dense buffer cleared only where the last batch
wrote). Output buffers are fresh tensors (optionally in shared memory, for DataLoader workers) or
a reused :class:`~morphomol.data.feed.Slot`. Cached features (``TileStream.features``) are read with
the tile chunk they belong to (rows ``i0:i1`` of the sample's features store) into pooled buffers and
copied row by row into the batch like the images.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from morphomol.data.stores import SampleStore
from morphomol.util.numba import njit_kernels, numba_module

if TYPE_CHECKING:
    from morphomol.data.feed import Slot
    from morphomol.data.loader import TileStream

N_TOKENS = 196


def _torch():
    import torch

    return torch


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

    @nb.njit(cache=True, nogil=True)
    def gather_dense_at(ip, tk, gn, ct, off, pos, lut, Gc, out, flat, w):  # type: ignore[no-untyped-def]
        # into a reused dense buffer, recording where it wrote (cleared there before the next batch)
        for q in range(off.shape[0]):
            o = off[q]
            base = pos[q] * 196
            for e in range(ip[o], ip[o + 1]):
                g = lut[gn[e]]
                if g >= 0:
                    j = (base + tk[e]) * Gc + g
                    out[j] = ct[e]
                    flat[w] = j
                    w += 1
        return w

    @nb.njit(cache=True, nogil=True)
    def clear_at(out, flat, w):  # type: ignore[no-untyped-def]
        # a reused dense buffer is cleared where the previous batch wrote, not as a whole
        for k in range(w):
            out[flat[k]] = 0.0

    return {"take_rows": take_rows, "take_counts": take_counts, "gather_coo": gather_coo, "gather_dense": gather_dense,
            "gather_dense_at": gather_dense_at, "clear_at": clear_at}


def coo_dtype(n_entries: int) -> Any:
    """Index dtype of flat COO token indices into ``n_entries`` dense entries (int32 when they fit)."""
    return np.int32 if n_entries < 2**31 else np.int64


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


class BufferPool:
    """Free chunk buffers (decoded image chunks, token-array buffers), reused instead of fresh
    memory (first touches of fresh pages cost more than decoding into them); thread-safe, so the
    threads of a feed share one pool. Holds at most ``cap`` buffers of each kind."""

    def __init__(self, cap: int) -> None:
        self.cap = int(cap)
        self._free: dict[Any, list[Any]] = {}
        self._lock = threading.Lock()

    def take(self, kind: Any, make: Any) -> Any:
        with self._lock:
            free = self._free.get(kind)
            if free:
                return free.pop()
        return make()

    def give(self, kind: Any, buf: Any) -> None:
        with self._lock:
            free = self._free.setdefault(kind, [])
            if len(free) < self.cap:
                free.append(buf)


class ChunkDecoder:
    """Decode state of one thread or process over a :class:`TileStream`: open stores, gene maps,
    reused chunk buffers; :meth:`collate` assembles a batch (fresh tensors, or a reused slot)."""

    def __init__(self, ts: TileStream, pool: BufferPool | None = None) -> None:
        self.ts = ts
        self._stores: dict[int, SampleStore] = {}
        self._feats: dict[tuple[str, int], Any] = {}  # (field, sample) -> ChunkReader of its features array
        self._maps: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.pool = pool if pool is not None else BufferPool(2 * ts.buffer_chunks + 2)

    def store(self, si: int) -> SampleStore:
        if si not in self._stores:
            st = SampleStore(self.ts.stores[self.ts.samples[si]])
            self._stores[si] = st
            core_idx, addon_idx = st.gene_index(self.ts.core), st.gene_index(self.ts.addon)
            lut = np.full(len(st.genes), -1, np.int64)
            lut[core_idx] = np.arange(len(core_idx))
            self._maps[si] = (core_idx, addon_idx, lut)
        return self._stores[si]

    def read_chunk(self, si: int, c: int) -> dict[str, Any]:
        st = self.store(si)
        C = st.chunk_tiles
        i0, i1 = c * C, min((c + 1) * C, st.n_tiles)
        d: dict[str, Any] = {"si": si, "i0": i0, "tc": st.read_tile_counts(i0, i1)}
        if self.ts.want_images:
            rd = st.image_chunks
            d["buf"] = self.pool.take(("img", rd.C, rd.row_shape), rd.empty)
            d["img"] = rd.read(c, d["buf"]).reshape(i1 - i0, -1)
        if self.ts.want_tokens:
            d["tbuf"] = self.pool.take("tok", dict)
            d["tok"] = st.read_tokens(i0, i1, d["tbuf"])
        if self.ts.features:
            d["feat"], d["fbuf"] = {}, {}
            for name in self.ts.features:
                rd = self.feature_reader(name, si)
                kind = ("feat", C, rd.row_shape)
                buf = d["fbuf"][name] = self.pool.take(kind, lambda shape=(C, *rd.row_shape): np.empty(shape, np.float32))
                d["feat"][name] = rd.read_range(i0, i1, out=buf)
        return d

    def feature_reader(self, name: str, si: int) -> Any:
        """Whole-chunk reader of the features array of field ``name`` of sample ``si`` (opened once)."""
        key = (name, si)
        if key not in self._feats:
            from morphomol.data.chunks import ChunkReader
            from morphomol.data.features import _features_array

            path = self.ts.features[name][si]
            _, arr = _features_array(path)
            if np.dtype(arr.dtype) != np.float32:
                from morphomol.errors import InputError

                raise InputError(f"features are {arr.dtype}", file=path, field="features",
                                 expected="float32 (N, D) features written by the features rule")
            self._feats[key] = ChunkReader(arr)
        return self._feats[key]

    def release(self, ch: dict[str, Any]) -> None:
        """A chunk is no longer needed: its buffers back to the pool (reused: no fresh memory)."""
        if "buf" in ch:
            b = ch.pop("buf")
            self.pool.give(("img", b.shape[0], b.shape[1:]), b)
        if "tbuf" in ch:
            self.pool.give("tok", ch.pop("tbuf"))
        for buf in ch.pop("fbuf", {}).values():
            self.pool.give(("feat", buf.shape[0], buf.shape[1:]), buf)

    def rotate(self, prev: dict[tuple[int, int], dict[str, Any]], cur: dict[tuple[int, int], dict[str, Any]]) -> None:
        """A unit ended: chunks of two units ago (not needed by ``cur``) give their buffers back."""
        for kk, ch in prev.items():
            if kk not in cur:
                self.release(ch)

    def groups(self, batch: np.ndarray, cur: dict[tuple[int, int], dict[str, Any]],
               prev: dict[tuple[int, int], dict[str, Any]]) -> list[tuple[dict[str, Any], np.ndarray, np.ndarray]]:
        """The batch's tiles grouped by chunk: (chunk, offsets in it, positions in the batch)."""
        ts = self.ts
        si_all, idx_all = batch[:, 0], batch[:, 1]
        ck_all = idx_all // ts.chunk_size[si_all]
        key = si_all * (1 << 40) + ck_all
        order = np.argsort(key, kind="stable")  # positions stay in batch order inside a group
        cuts = np.flatnonzero(np.diff(key[order])) + 1
        groups = []
        for g in np.split(order, cuts):
            kk = (int(si_all[g[0]]), int(ck_all[g[0]]))
            ch = cur.get(kk) or prev.get(kk)
            if ch is None:
                ch = cur[kk] = self.read_chunk(*kk)
            elif kk not in cur:
                cur[kk] = ch  # still needed by this unit: keep it past the next release
            groups.append((ch, (idx_all[g] - ch["i0"]).astype(np.int64), g.astype(np.int64)))
        return groups

    def collate(self, batch: np.ndarray, cur: dict[tuple[int, int], dict[str, Any]],
                prev: dict[tuple[int, int], dict[str, Any]], shared: bool = False,
                slot: Slot | None = None) -> dict[str, Any]:
        """One batch (module doc); into fresh tensors (``shared``: in shared memory) or into ``slot``."""
        torch = _torch()
        k = _kernels()
        ts = self.ts
        B = len(batch)
        Gc, Ga = len(ts.core), len(ts.addon)
        groups = self.groups(batch, cur, prev)
        out: dict[str, Any] = {}
        if ts.want_images:
            row = groups[0][0]["buf"].shape[1:]
            if slot is None:
                t_img, img = _alloc((B, *row), np.uint8, shared=shared)
            else:
                t_img, img = slot.take("image", (B, *row), np.uint8)
            img2 = img.reshape(B, -1)
            for ch, off, pos in groups:
                k["take_rows"](ch["img"], off, pos, img2)
            out["image"] = t_img
        if slot is None:
            t_core, tc_core = _alloc((B, Gc), np.float32, shared=shared)
            t_tgt, tgt = _alloc((B, Ga), np.float32, shared=shared)
        else:
            t_core, tc_core = slot.take("tile_counts", (B, Gc), np.float32)
            t_tgt, tgt = slot.take("targets", (B, Ga), np.float32)
        for ch, off, pos in groups:
            core_idx, addon_idx, _ = self._maps[ch["si"]]
            k["take_counts"](ch["tc"], off, pos, core_idx, addon_idx, tc_core, tgt)
        np.log1p(tgt, out=tgt)
        if ts.want_tokens:
            fmt = ts.token_format if slot is None else slot.tokens
            n_dense = B * N_TOKENS * Gc
            if fmt == "dense" and slot is None:
                t_tok, dense = _alloc((n_dense,), np.float32, shared=shared, zero=True)
                for ch, off, pos in groups:
                    ip, tk, gn, ct = ch["tok"]
                    k["gather_dense"](ip, tk, gn, ct, off, pos, self._maps[ch["si"]][2], Gc, dense)
                out["tokens"] = t_tok.view(B, N_TOKENS, Gc)
            else:
                tot = sum(int((ch["tok"][0][off + 1] - ch["tok"][0][off]).sum()) for ch, off, pos in groups)
                idt = coo_dtype(n_dense)
                if slot is None:
                    t_flat, flat = _alloc((tot,), idt, shared=shared)
                    t_vals, vals = _alloc((tot,), np.float32, shared=shared)
                else:
                    t_flat, flat, t_vals, vals = slot.coo(tot, idt)
                w = 0
                if fmt == "dense":  # a reused dense buffer (CPU feed): written here, in the decode thread
                    t_tok, dense = slot.dense(n_dense)
                    for ch, off, pos in groups:
                        ip, tk, gn, ct = ch["tok"]
                        w = k["gather_dense_at"](ip, tk, gn, ct, off, pos, self._maps[ch["si"]][2], Gc, dense, flat, w)
                    slot.written = w
                    out["tokens"] = t_tok[:n_dense].view(B, N_TOKENS, Gc)
                else:
                    for ch, off, pos in groups:
                        ip, tk, gn, ct = ch["tok"]
                        w = k["gather_coo"](ip, tk, gn, ct, off, pos, self._maps[ch["si"]][2], Gc, flat, vals, w)
                    out["token_index"] = t_flat[:w]
                    out["token_value"] = t_vals[:w]
                    out["token_shape"] = (B, N_TOKENS, Gc)
        for name, D in ts.feature_dims.items():
            if slot is None:
                t_f, f = _alloc((B, D), np.float32, shared=shared)
            else:
                t_f, f = slot.take(name, (B, D), np.float32)
            for ch, off, pos in groups:
                k["take_rows"](ch["feat"][name], off, pos, f)
            out[name] = t_f
        out["tile_counts"] = t_core
        out["targets"] = t_tgt
        si_all, idx_all = batch[:, 0], batch[:, 1]
        out["index"] = torch.from_numpy(idx_all.copy())
        out["tile_id"] = ts._ids[ts._id_base[si_all] + idx_all].tolist()
        return out
