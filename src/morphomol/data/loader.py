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
(DataLoader round-robin over workers). :mod:`morphomol.data.feed` runs the same decoding in
threads of the training process instead, into reused (pinned) buffers, in the in-process order
for any number of threads.

``buffer_batches`` raises the shuffle buffer to at least that many batches (at batch 512 and 64-tile
chunks, 8 chunks would hold exactly one batch: every batch would be 8 contiguous chunks).
``features`` (field -> sample -> features zarr, :mod:`morphomol.data.features`): cached frozen features
read with the tile chunks they belong to (rows ``i0:i1`` of the sample's store for tile chunk ``[i0, i1)``),
into reused chunk buffers, and gathered into the batch like the tile counts: a run on cached features
holds the chunks of its shuffle buffer, never a partition's (N, D) features.
``shard=(rank, world)`` (data-parallel training) cuts every batch, its tiles ordered by chunk, into
``world`` near-equal contiguous parts and keeps part ``rank``: the ranks together see the very
batches of one process, each tile once, and each rank decodes about ``1/world`` of the chunks.
``skip`` (a mid-epoch resume) drops the first batches in the plan, before any chunk is read.

Batch (dict), B tiles:
  ``image``        uint8  (B, 224, 224, 3)  (normalisation is the model's job)
  ``tokens``       float32 (B, 196, G_core) raw counts       (token_format="dense")
  ``token_index``  int32 (nnz,) flat index into (B, 196, G_core) (int64 if that has >= 2**31
                   entries), ``token_value`` float32 (nnz,)
                                                              (token_format="coo"; see :func:`densify_tokens`)
  ``tile_counts``  float32 (B, G_core) raw counts of the core genes over the tile
  ``targets``      float32 (B, G_addon) log1p of the add-on gene counts over the tile
  ``<field>``      float32 (B, D) cached features of each ``features`` field (e.g. ``morph_feat``)
  ``index``        int64 (B,) row in the sample's stores; ``tile_id`` list[str]
Inputs are raw counts: the model applies log1p (the paper pools, then log1p).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.data.collate import N_TOKENS, BufferPool, ChunkDecoder, _kernels, coo_dtype  # noqa: F401
from morphomol.data.folds import check_split_table
from morphomol.data.stores import SampleStore, StorePaths
from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("data.loader")


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


def shard_batch(batch: np.ndarray, chunk_size: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Part ``rank`` of ``world`` of one batch: its tiles ordered by (sample, chunk), cut into
    near-equal contiguous parts (``np.array_split``), so that a rank reads few of the chunks."""
    if world <= 1:
        return batch
    key = batch[:, 0] * (1 << 40) + batch[:, 1] // chunk_size[batch[:, 0]]
    order = np.argsort(key, kind="stable")
    return batch[np.array_split(order, world)[rank]]


def worker_skips(lengths: Sequence[int], skip: int) -> tuple[list[int], int]:
    """(batches each DataLoader worker must drop, the worker whose batch comes next) so that an
    iteration yields exactly what follows the first ``skip`` batches of a full one: the DataLoader
    takes workers' batches in turn (exhausted workers left out), always starting at worker 0, so the
    workers are rotated to start at the one that was next."""
    W = len(lengths)
    done, k, w = [0] * W, int(skip), 0
    while any(d < n for d, n in zip(done, lengths)):
        if done[w] < lengths[w]:
            if k == 0:
                return done, w
            done[w] += 1
            k -= 1
        w = (w + 1) % W
    return done, 0


def _torch():
    import torch

    return torch


class TileStream:
    """Iterable dataset of collated batches (see module doc). Use through :func:`make_loader`."""

    def __init__(self, split: pd.DataFrame, panel: Mapping[str, Any], stores: Mapping[str, StorePaths],
                 partition: str | Sequence[str], *, batch_size: int = 256, shuffle: bool = True, seed: int = 0,
                 buffer_chunks: int = 8, drop_last: bool = False, token_format: str = "dense", images: bool = True,
                 tokens: bool = True, grid: int = 14, buffer_batches: int = 0,
                 features: Mapping[str, Mapping[str, str | Path]] | None = None) -> None:
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
        # chunk layout (opened once here, in the parent, only for the chunk size)
        self.chunks: list[tuple[int, int, np.ndarray]] = []
        self.chunk_size = np.zeros(len(self.samples), np.int64)
        self._id_base = np.zeros(len(self.samples), np.int64)  # tile_id of (s, i) = _ids[_id_base[s] + i]
        id_parts = []
        rows_of = split.groupby(split["sample_id"].astype(str), sort=False).indices  # one pass, not one per sample
        index_all = split["index"].to_numpy(np.int64)
        tile_all = split["tile_id"].astype(str).to_numpy(object)
        for si, s in enumerate(self.samples):
            rows = rows_of[s]
            raw = index_all[rows]
            idx = np.sort(raw)
            ids = np.empty(int(idx[-1]) + 1, object)
            ids[raw] = tile_all[rows]
            self._id_base[si] = sum(len(x) for x in id_parts)
            id_parts.append(ids)
            C = SampleStore(self.stores[s]).chunk_tiles
            self.chunk_size[si] = C
            ck = idx // C
            for c in np.unique(ck):
                self.chunks.append((si, int(c), idx[ck == c]))
        self._ids = np.concatenate(id_parts)
        self.n_tiles = int(sum(len(c[2]) for c in self.chunks))
        # cached features: field -> per-sample store (list indexed like self.samples), width per field
        self.features: dict[str, list[Path]] = {}
        self.feature_dims: dict[str, int] = {}
        if features:
            from morphomol.data.features import check_feature_stores

            need = {s: len(id_parts[si]) for si, s in enumerate(self.samples)}  # max index + 1
            for name, per_sample in features.items():
                self.feature_dims[str(name)] = check_feature_stores(per_sample, need)
                self.features[str(name)] = [Path(per_sample[s]) for s in self.samples]
        if buffer_batches > 0:  # at least `buffer_batches` batches in the shuffle buffer
            need = -(-int(buffer_batches) * self.batch_size // int(self.chunk_size.min()))
            self.buffer_chunks = max(self.buffer_chunks, need)
        self._len: int | None = None
        # epoch, skip, rank, world: shared with worker processes through shared memory
        self._state = torch.tensor([0, 0, 0, 1], dtype=torch.int64).share_memory_()
        self._decoder: ChunkDecoder | None = None

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_decoder"] = None  # each process opens its own stores
        return d

    # epoch handling (shared with worker processes through shared memory)
    def set_epoch(self, epoch: int, *, skip: int = 0, shard: tuple[int, int] | None = None) -> None:
        """Epoch of the next iteration; ``skip`` its first batches (resume); ``shard`` = (rank, world)."""
        rank, world = shard or (0, 1)
        if not 0 <= rank < world:
            raise ValueError(f"shard rank {rank} not in [0, {world})")
        self._state[:] = _torch().tensor([int(epoch), int(skip), int(rank), int(world)])

    @property
    def epoch(self) -> int:
        return int(self._state[0])

    def plan(self, epoch: int | None = None, shard: tuple[int, int] | None = None) -> list[list[np.ndarray]]:
        """Units of batches of ``epoch``; with ``shard``, every batch cut to the rank's part."""
        units = plan_epoch(self.chunks, self.batch_size, shuffle=self.shuffle, seed=self.seed,
                           epoch=self.epoch if epoch is None else epoch, buffer_chunks=self.buffer_chunks,
                           drop_last=self.drop_last)
        if shard is not None and shard[1] > 1:
            units = [[shard_batch(b, self.chunk_size, shard[0], shard[1]) for b in u] for u in units]
        return units

    def decoder(self, pool: BufferPool | None = None) -> ChunkDecoder:
        """A new decode state (open stores, gene maps): one per thread or process; chunk buffers
        come from ``pool`` (shared by a feed's threads) or a pool of its own."""
        return ChunkDecoder(self, pool)

    def __len__(self) -> int:
        if self._len is None:  # the same for every epoch: full batches + the final remainder
            self._len = sum(len(u) for u in self.plan(0))
        return self._len

    def __iter__(self) -> Iterator[dict[str, Any]]:
        torch = _torch()
        info = torch.utils.data.get_worker_info()
        w, W = (0, 1) if info is None else (info.id, info.num_workers)
        epoch, skip, rank, world = (int(x) for x in self._state)
        units = self.plan(epoch, (rank, world))
        done, start = worker_skips([sum(len(u) for u in units[v::W]) for v in range(W)], skip)
        v = (w + start) % W  # this worker plays worker v of a full iteration
        mine, drop = units[v::W], done[v]
        if self._decoder is None:
            self._decoder = self.decoder()
        dec = self._decoder
        prev: dict[tuple[int, int], dict[str, Any]] = {}
        for u in mine:
            cur: dict[tuple[int, int], dict[str, Any]] = {}
            for batch in u:
                if drop:  # consumed before a resume: planned, never read
                    drop -= 1
                    continue
                yield dec.collate(batch, cur, prev, shared=info is not None)
            dec.rotate(prev, cur)
            prev = cur  # keep the last unit's chunks (carried tiles come from them)


def densify_tokens(batch: dict[str, Any], device: Any = None) -> Any:
    """(B, 196, G_core) float32 tensor from a batch (dense passthrough or COO scatter on ``device``;
    from pinned memory the index/value copies are asynchronous)."""
    torch = _torch()
    if "tokens" in batch:
        return batch["tokens"].to(device, non_blocking=True) if device is not None else batch["tokens"]
    B, T, G = batch["token_shape"]
    out = torch.zeros(B * T * G, dtype=torch.float32, device=device)
    out[batch["token_index"].to(device, non_blocking=True)] = batch["token_value"].to(device, non_blocking=True)
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

    def set_epoch(self, epoch: int, *, skip: int = 0, shard: tuple[int, int] | None = None) -> None:
        """Epoch of the next iteration; ``skip``: drop its first batches unread; ``shard``: (rank, world)."""
        self.dataset.set_epoch(epoch, skip=skip, shard=shard)
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


def make_loader(split: pd.DataFrame, panel: Mapping[str, Any], stores: Mapping[str, StorePaths],
                partition: str | Sequence[str], *, batch_size: int = 256, shuffle: bool = True, seed: int = 0,
                num_workers: int = 0, buffer_chunks: int = 8, drop_last: bool = False, token_format: str = "dense",
                images: bool = True, tokens: bool = True, pin_memory: bool = False,
                buffer_batches: int = 0, features: Mapping[str, Mapping[str, str | Path]] | None = None) -> TileLoader:
    """Loader over one partition ("fit", "val", "test" or a list) of a unit-level split (the table
    :func:`morphomol.data.folds.unit_split` builds from the fold table), reading the given per-sample
    stores (and ``features``: field -> sample -> features zarr). Shuffle is deterministic in (seed, epoch)."""
    split = check_split_table(split)
    ds = TileStream(split, panel, stores, partition, batch_size=batch_size, shuffle=shuffle, seed=seed,
                    buffer_chunks=buffer_chunks, drop_last=drop_last, token_format=token_format, images=images,
                    tokens=tokens, buffer_batches=buffer_batches, features=features)
    return TileLoader(ds, num_workers=num_workers, pin_memory=pin_memory)
