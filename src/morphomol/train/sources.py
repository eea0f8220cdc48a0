"""Batch sources: what the loop iterates over.

Batch contract (what a source's ``epoch(...)`` yields, a dict of tensors): the fields a run asks
for plus ``tile_id`` (a list of unit ids). Fusion: ``image`` uint8 (B, 224, 224, 3); ``tokens``
float32 (B, 196, G_core) raw counts; ``tile`` float32 (B, G_core) raw tile-level core counts;
``target`` float32 (B, G_addon) already log1p; cached frozen features ``morph_feat`` / ``expr_feat``
float32 (B, D). Models apply ``log1p`` to counts themselves.

Determinism: with ``shuffle`` the order of epoch ``e`` depends only on ``(seed, e)`` (and, for the
store loader, its chunk layout); ``skip`` drops the first batches (a mid-epoch resume).

Optional keywords: a source lists in ``epoch_options`` the optional keywords its ``epoch`` takes
(the trainer passes only those): ``device`` (batches delivered on the device; a batch may then
live in reused buffers, valid until the next batch is asked for), ``threads`` (decode threads of
the store feed), ``shard=(rank, world)`` (data-parallel training: this process's part of every
batch; the parts of all ranks are the batches of one process, each unit once).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch


class BatchSource(Protocol):
    """One partition of a fold as the trainer sees it (``InMemoryTiles``, ``StoreSplit``, ``WithFeatures``).

    ``epoch(...)`` yields the batches of epoch ``epoch`` (dicts following the batch contract,
    restricted to ``fields`` + ``tile_id``); with ``shuffle`` their order must depend only on
    ``(seed, epoch)`` (and the loader layout), and ``skip`` drops the first batches (resume).
    """

    tile_ids: Sequence[str]

    def __len__(self) -> int: ...

    def n_batches(self, batch_size: int, drop_last: bool = False) -> int: ...

    def epoch(self, epoch: int, *, batch_size: int, fields: Sequence[str], seed: int = 0, shuffle: bool = True,
              drop_last: bool = False, skip: int = 0, num_workers: int = 0,
              pin_memory: bool = False) -> Iterable[dict[str, Any]]: ...


def epoch_options(ds: Any) -> frozenset[str]:
    """The optional ``epoch`` keywords a source supports (see the module doc)."""
    return frozenset(getattr(ds, "epoch_options", ()))


def shard_rows(idx: np.ndarray, shard: tuple[int, int] | None) -> np.ndarray:
    """Part ``rank`` of ``world`` near-equal contiguous parts of one batch's rows."""
    if shard is None or shard[1] <= 1:
        return idx
    return np.array_split(np.asarray(idx), shard[1])[shard[0]]


def epoch_batches(ds: Any, batch_size: int, seed: int, epoch: int, *, shuffle: bool = True,
                  drop_last: bool = False) -> list[np.ndarray]:
    """Index batches of one epoch over ``len(ds)`` rows; the order depends only on ``(seed, epoch)``."""
    n = len(ds)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    return [order[i:min(i + batch_size, stop)] for i in range(0, stop, batch_size)]


class _BatchList(torch.utils.data.Dataset):
    def __init__(self, ds: InMemoryTiles, batches: Sequence[np.ndarray], fields: Sequence[str]) -> None:
        self.ds, self.batches, self.fields = ds, list(batches), list(fields)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.ds.get_batch(self.batches[i], self.fields)


class InMemoryTiles:
    """The batch contract over in-memory numpy arrays (tests, benchmarks, small cohorts)."""

    epoch_options = frozenset({"shard"})

    def __init__(self, tile_ids: Sequence[str], **arrays: np.ndarray | None) -> None:
        self.tile_ids = list(tile_ids)
        self.arrays = {k: v for k, v in arrays.items() if v is not None}
        for k, v in self.arrays.items():
            if len(v) != len(self.tile_ids):
                raise ValueError(f"array {k} has {len(v)} rows for {len(self.tile_ids)} tiles")

    def __len__(self) -> int:
        return len(self.tile_ids)

    def n_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return len(epoch_batches(self, batch_size, 0, 0, shuffle=False, drop_last=drop_last))

    def get_batch(self, idx: np.ndarray, fields: Sequence[str]) -> dict[str, Any]:
        idx = np.asarray(idx)
        out: dict[str, Any] = {"tile_id": [self.tile_ids[i] for i in idx]}
        for f in fields:
            if f not in self.arrays:
                raise KeyError(f"field '{f}' not available (have {sorted(self.arrays)})")
            out[f] = torch.from_numpy(np.ascontiguousarray(self.arrays[f][idx]))
        return out

    def epoch(self, epoch: int, *, batch_size: int, fields: Sequence[str], seed: int = 0, shuffle: bool = True,
              drop_last: bool = False, skip: int = 0, num_workers: int = 0, pin_memory: bool = False,
              shard: tuple[int, int] | None = None) -> Iterable[dict[str, Any]]:
        batches = epoch_batches(self, batch_size, seed, epoch, shuffle=shuffle, drop_last=drop_last)[skip:]
        batches = [shard_rows(b, shard) for b in batches]
        if num_workers <= 0 or not batches:
            return (self.get_batch(b, fields) for b in batches)
        return torch.utils.data.DataLoader(_BatchList(self, batches, fields), batch_size=None, shuffle=False,
                                           num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=4)

    def subset(self, idx: np.ndarray) -> InMemoryTiles:
        idx = np.asarray(idx)
        return InMemoryTiles([self.tile_ids[i] for i in idx], **{k: v[idx] for k, v in self.arrays.items()})


class WithFeatures:
    """A partition plus cached per-tile features (``morph_feat`` / ``expr_feat``), rows aligned to ``tile_ids``."""

    def __init__(self, base: BatchSource, features: Mapping[str, np.ndarray]) -> None:
        self.base = base
        self.epoch_options = epoch_options(base)
        self.features = dict(features)
        self.tile_ids = base.tile_ids
        self.row = {t: i for i, t in enumerate(base.tile_ids)}
        for k, v in self.features.items():
            if len(v) != len(base):
                raise ValueError(f"{k}: {len(v)} feature rows for {len(base)} tiles")

    def __len__(self) -> int:
        return len(self.base)

    def n_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return self.base.n_batches(batch_size, drop_last)

    def epoch(self, epoch: int, *, batch_size: int, fields: Sequence[str], **kw: Any) -> Iterator[dict[str, Any]]:
        own = [f for f in fields if f in self.features]
        dev = kw.get("device")
        cuda = dev is not None and torch.device(dev).type == "cuda"
        for batch in self.base.epoch(epoch, batch_size=batch_size, fields=[f for f in fields if f not in own], **kw):
            rows = np.fromiter((self.row[t] for t in batch["tile_id"]), np.int64, len(batch["tile_id"]))
            for f in own:
                t = torch.from_numpy(self.features[f][rows])
                # to the device from page-locked memory: a copy from pageable memory would wait for the
                # device to drain the previous step
                batch[f] = t.pin_memory().to(dev, non_blocking=True) if cuda else t
            yield batch


def gather(ds: BatchSource, fields: Sequence[str], batch_size: int = 4096) -> dict[str, Any]:
    """Whole partition in memory: ``{field: (N, ...) float32, "tile_id": [...]}`` in the loader's order."""
    parts: dict[str, list[np.ndarray]] = {f: [] for f in fields}
    ids: list[str] = []
    for b in ds.epoch(0, batch_size=batch_size, fields=fields, shuffle=False):
        ids += list(b["tile_id"])
        for f in fields:
            parts[f].append(np.asarray(b[f], dtype=np.float32))
    out: dict[str, Any] = {f: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for f, v in parts.items()}
    out["tile_id"] = ids
    return out
