"""Batch sources of the spots head that read one chunk of spots at a time (rule ``spots_train``).

A :class:`SpotStream` is one partition of a fold: its samples' spots in the order of the unit tables. It
holds only small per-spot arrays (unit ids, the chunk of every spot, caption rows) and reads features
(from each sample's features store) and targets (sparse rows of the fold's genes from each unit table,
transformed) per *chunk* of ``chunk_rows`` consecutive spots of one sample.

Memory is bounded by the buffer (``buffer_mb``, features + targets [+ captions] of the rows it holds):

* a partition that fits the buffer is read once and kept (*resident*); its epochs are the in-memory
  order of :func:`morphomol.train.sources.epoch_batches` — a full random permutation per ``(seed, epoch)``;
* a larger partition is streamed with the fusion loader's chunk-shuffled plan
  (:func:`morphomol.data.loader.plan_epoch`): chunks shuffled, ``buffer_mb`` worth of chunks filled into
  the buffer, their spots shuffled and cut into batches (the remainder carried into the next fill). The
  order then depends on ``(seed, epoch, batch_size, chunk_rows, buffer)``, not on the partition alone.

Unshuffled epochs (prediction) are the partition's order in both modes; streamed, they hold one chunk (+ the
rows of the previous chunk that complete a batch) at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from morphomol.errors import InputError
from morphomol.studies.spots.data import UnitRows
from morphomol.util.logs import get_logger

log = get_logger("spots.stream")

BUFFER_MB = 512.0    # default spots buffer of one partition (features + targets)
CHUNK_ROWS = 1024    # spots of one sample read at once


@dataclass(frozen=True)
class TextRows:
    """Caption embeddings of the cohort and each unit's row in them (-1: no caption)."""

    embeddings: np.ndarray              # (M, T) float32: the captioned spots only
    row: Mapping[str, int]

    @classmethod
    def read(cls, table: str | Path, store: str | Path) -> TextRows:
        from morphomol.studies.spots.text import read_text

        df, emb = read_text(table, store)
        return cls(emb, {str(u): i for i, u in enumerate(df["unit_id"].astype(str))})


class SpotStream:
    """One partition of a fold (see the module docstring); the batch contract of
    :mod:`morphomol.train.sources` with fields ``features``, ``target`` [, ``text``, ``has_text``]."""

    epoch_options = frozenset()

    def __init__(self, units: Mapping[str, UnitRows], features: Mapping[str, str | Path], *, transform: str,
                 target_sum: float, text: TextRows | None = None, buffer_mb: float = BUFFER_MB,
                 chunk_rows: int = CHUNK_ROWS) -> None:
        from morphomol.data.features import read_features_attrs

        self.units = dict(units)
        self.features = {s: Path(features[s]) for s in self.units}
        self.transform, self.target_sum = transform, float(target_sum)
        self.text = text
        self.tile_ids: list[str] = []
        chunks: list[tuple[int, int, np.ndarray]] = []   # (sample index, chunk index, positions)
        self._blocks: list[tuple[str, int, int, int]] = []  # per chunk: sample, first row, stop row, first position
        dims = set()
        pos = 0
        for si, (s, u) in enumerate(self.units.items()):
            if s not in features:
                raise InputError(f"no features store for sample {s}", field="features",
                                 expected="a features store per sample of the cohort")
            attrs = read_features_attrs(self.features[s])
            n_feat = int(attrs.get("n_tiles", -1))
            if n_feat >= 0 and n_feat != len(u):
                raise InputError(f"{n_feat} feature rows for {len(u)} units", file=self.features[s], field="features",
                                 expected=f"one row per unit of {u.path}")
            dims.add(int(attrs["dim"]) if "dim" in attrs else self._dim_of(s))
            self.tile_ids += u.ids.tolist()
            for c0 in range(0, len(u), chunk_rows):
                c1 = min(c0 + chunk_rows, len(u))
                chunks.append((si, len(chunks), np.arange(pos + c0, pos + c1, dtype=np.int64)))
                self._blocks.append((s, c0, c1, pos + c0))
            pos += len(u)
        if len(dims) > 1:
            raise InputError(f"feature widths {sorted(dims)} differ across samples", field="dim",
                             expected="one encoder (one feature width) for every sample")
        self.dim = dims.pop() if dims else 0
        self.n_genes = len(next(iter(self.units.values())).genes) if self.units else 0
        self._chunks = chunks
        self._chunk_of = np.empty(pos, np.int32)
        for c, (_, _, p) in enumerate(chunks):
            self._chunk_of[p] = c
        self.text_index: np.ndarray | None = None
        if text is not None:
            self.text_index = np.fromiter((text.row.get(t, -1) for t in self.tile_ids), np.int64, len(self.tile_ids))
            self._text_index0 = self.text_index.copy()
        row_bytes = 4 * (self.dim + self.n_genes + (text.embeddings.shape[1] if text is not None else 0))
        self.buffer_rows = max(1, int(float(buffer_mb) * 1e6 // max(row_bytes, 1)))
        self.buffer_chunks = max(1, self.buffer_rows // max(1, chunk_rows))
        self.resident = len(self.tile_ids) <= self.buffer_rows
        self._arrays: dict[str, np.ndarray] | None = None
        self.peak_rows = 0  # most spots held at once by a streamed epoch

    def _dim_of(self, s: str) -> int:
        from morphomol.data.features import read_features

        return int(read_features(self.features[s], np.zeros(1, np.int64))[0].shape[1])

    def __len__(self) -> int:
        return len(self.tile_ids)

    def shuffle_text(self, seed: int | None) -> None:
        """Null control: captions permuted across the partition's spots that have one, with ``seed``
        (``None``: the spots' own captions again)."""
        assert self.text_index is not None and self.text is not None
        idx = self._text_index0.copy()
        if seed is not None:
            w = np.flatnonzero(idx >= 0)
            idx[w] = idx[np.random.default_rng([int(seed), 7919]).permutation(w)]
        self.text_index = idx
        if self._arrays is not None:  # resident: only the caption rows change
            self._arrays["text"] = self._text_rows(idx)

    def _text_rows(self, idx: np.ndarray) -> np.ndarray:
        assert self.text is not None
        t = np.zeros((len(idx), self.text.embeddings.shape[1]), np.float32)
        t[idx >= 0] = self.text.embeddings[idx[idx >= 0]]
        return t

    # ---------------------------------------------------------------- reading
    def _read_chunk(self, c: int) -> dict[str, np.ndarray]:
        from morphomol.data.features import read_features

        s, r0, r1, p0 = self._blocks[c]
        feats, _ = read_features(self.features[s], np.arange(r0, r1, dtype=np.int64))
        out = {"features": feats, "target": self.units[s].targets(r0, r1, self.transform, self.target_sum)}
        if self.text is not None:
            assert self.text_index is not None
            idx = self.text_index[p0:p0 + (r1 - r0)]
            out.update(text=self._text_rows(idx), has_text=(idx >= 0).astype(np.float32))
        return out

    def _resident(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            parts = [self._read_chunk(c) for c in range(len(self._chunks))]
            keys = parts[0].keys() if parts else ("features", "target")
            self._arrays = {k: np.concatenate([p[k] for p in parts]) if parts
                            else np.zeros((0, self.dim if k == "features" else self.n_genes), np.float32) for k in keys}
        return self._arrays

    def target_mean(self) -> np.ndarray:
        """Mean target per gene over the partition (float32)."""
        if self.resident:
            return self._resident()["target"].mean(axis=0)
        s = np.zeros(self.n_genes)
        for c in range(len(self._chunks)):
            s += self._read_chunk(c)["target"].sum(axis=0, dtype=np.float64)
        return (s / max(len(self), 1)).astype(np.float32)

    # ---------------------------------------------------------------- batches
    def n_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        if drop_last and n >= batch_size:
            return n // batch_size
        return -(-n // batch_size)

    def epoch(self, epoch: int, *, batch_size: int, fields: Sequence[str], seed: int = 0, shuffle: bool = True,
              drop_last: bool = False, skip: int = 0, num_workers: int = 0,
              pin_memory: bool = False) -> Iterator[dict[str, Any]]:
        if self.resident:
            from morphomol.train.sources import InMemoryTiles

            mem = InMemoryTiles(self.tile_ids, **self._resident())
            yield from mem.epoch(epoch, batch_size=batch_size, fields=fields, seed=seed, shuffle=shuffle,
                                 drop_last=drop_last, skip=skip)
            return
        yield from self._streamed(epoch, batch_size=batch_size, fields=fields, seed=seed, shuffle=shuffle,
                                  drop_last=drop_last, skip=skip)

    def _streamed(self, epoch: int, *, batch_size: int, fields: Sequence[str], seed: int, shuffle: bool,
                  drop_last: bool, skip: int) -> Iterator[dict[str, Any]]:
        import torch

        from morphomol.data.loader import plan_epoch

        units = plan_epoch(self._chunks, batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                           buffer_chunks=self.buffer_chunks if shuffle else 1, drop_last=drop_last)
        seen = np.zeros(len(self._chunks), bool)  # chunks whose fill came before (their rows are carried)
        cache: dict[int, dict[str, np.ndarray]] = {}  # the chunks of the current fill
        carry: tuple[dict[int, int], dict[str, np.ndarray]] = ({}, {})  # rows carried over from earlier fills
        done = 0
        for unit in units:
            pos_u = np.concatenate([b[:, 1] for b in unit])
            ch_u = self._chunk_of[pos_u]
            if done + len(unit) <= skip:  # a resumed epoch: nothing read for the batches it skips
                done += len(unit)
                seen[ch_u] = True
                continue
            old = pos_u[seen[ch_u]]
            carry = self._rows_of(old, cache, carry)  # copies of the carried rows; the old chunks are dropped
            cache = {int(c): self._read_chunk(int(c)) for c in np.unique(ch_u[~seen[ch_u]])}
            seen[ch_u] = True
            self.peak_rows = max(self.peak_rows, sum(len(v["target"]) for v in cache.values()) + len(carry[0]))
            for b in unit:
                done += 1
                if done <= skip:
                    continue
                pos = b[:, 1]
                rows = self._rows_of(pos, cache, carry)[1]
                out: dict[str, Any] = {"tile_id": [self.tile_ids[p] for p in pos]}
                for f in fields:
                    if f not in rows:
                        raise KeyError(f"field '{f}' not available (have {sorted(rows)})")
                    out[f] = torch.from_numpy(rows[f])
                yield out

    def _rows_of(self, pos: np.ndarray, cache: dict[int, dict[str, np.ndarray]],
                 carry: tuple[dict[int, int], dict[str, np.ndarray]]) -> tuple[dict[int, int], dict[str, np.ndarray]]:
        """The rows of partition positions ``pos`` (in order) from the current chunks or the carried rows
        (chunks of neither are read: a resumed epoch's first fill)."""
        where, carried = carry
        ch = self._chunk_of[pos]
        out: dict[str, np.ndarray] = {}
        for c in np.unique(ch):
            m = ch == c
            src = cache.get(int(c))
            if src is not None:
                part = {k: v[pos[m] - self._blocks[int(c)][3]] for k, v in src.items()}
            elif all(int(p) in where for p in pos[m]):
                idx = np.fromiter((where[int(p)] for p in pos[m]), np.int64, int(m.sum()))
                part = {k: v[idx] for k, v in carried.items()}
            else:
                full = self._read_chunk(int(c))
                part = {k: v[pos[m] - self._blocks[int(c)][3]] for k, v in full.items()}
            for k, v in part.items():
                if k not in out:
                    out[k] = np.empty((len(pos),) + v.shape[1:], v.dtype)
                out[k][m] = v
        return {int(p): i for i, p in enumerate(pos)}, out
