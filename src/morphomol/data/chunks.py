"""Whole-chunk reads and writes of the zarr arrays the pipeline writes (tile images, token arrays).

Chunks of the writers' plain layout (zarr v3, bytes [+ one Blosc codec], no sharding, local store,
chunks spanning every axis but the first) are read straight from their files and decoded into a
caller's buffer: no zarr event-loop round trip, no intermediate copy. Anything else falls back to
zarr slicing.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np


class ChunkReader:
    """Whole-chunk reader of one zarr v3 array (see the module docstring)."""

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
            with open(p, "rb", buffering=0) as f:
                if not self.blosc:
                    return f.readinto(memoryview(out).cast("B")) == out.nbytes
                if os.fstat(f.fileno()).st_size < 16:
                    return False
                # decompressed straight from the page cache: no copy of the compressed bytes into
                # fresh memory (page faults on megabytes per chunk cost more than the decompression)
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    # blosc header: bytes 4..8 = uncompressed size (little endian)
                    if int.from_bytes(data[4:8], "little") != out.nbytes:
                        return False
                    from numcodecs import blosc

                    blosc.decompress(data, out)
                    return True
        except FileNotFoundError:  # never written: all fill value
            out[...] = self.fill
            return True

    def read(self, c: int, out: np.ndarray) -> np.ndarray:
        """Rows of chunk ``c`` into ``out`` ((C, *row_shape)); returns ``out[:rows in chunk]``."""
        i0 = c * self.C
        m = min(self.C, self.n - i0)
        if not self._decode(c, out):
            out[:m] = self.arr[i0:i0 + m]
        return out[:m]

    def read_range(self, i0: int, i1: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [i0, i1) (chunks fully inside are decoded in place, edge chunks through a scratch
        buffer); into ``out`` (at least ``i1 - i0`` rows: a reused buffer) when given."""
        if out is None:
            out = np.empty((i1 - i0, *self.row_shape), self.dtype)
        else:
            out = out[: max(0, i1 - i0)]
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


class ChunkFileWriter:
    """Whole chunks written straight to their files, for arrays of the plain *uncompressed* layout
    (zarr v3, bytes codec only, local store, chunks spanning every axis but the first): a chunk file
    is then the chunk's raw bytes, so writing costs what the disk costs (zarr's own write path runs
    at a fraction of that for megabyte chunks). ``ok`` is False for any other layout (use zarr)."""

    def __init__(self, arr: Any) -> None:
        self.arr = arr
        self.C = int(arr.chunks[0])
        self.row_shape = tuple(int(x) for x in arr.shape[1:])
        self.dtype = np.dtype(arr.dtype)
        self.ok = False
        try:
            from zarr.storage import LocalStore

            meta = arr.metadata
            names = [type(c).__name__ for c in meta.codecs]
            endian = meta.codecs[0].endian if names else None
            if (meta.zarr_format == 3 and isinstance(arr.store, LocalStore) and names == ["BytesCodec"]
                    and tuple(int(x) for x in arr.chunks[1:]) == self.row_shape
                    and (self.dtype.itemsize == 1 or endian is None
                         or endian.value == ("little" if np.little_endian else "big"))):
                self.base = Path(arr.store.root) / arr.path
                self._key = meta.encode_chunk_key
                self.fill = meta.fill_value
                self.ok = True
        except Exception:  # any surprise: use zarr itself
            self.ok = False

    def write(self, c: int, rows: np.ndarray) -> None:
        """Chunk ``c`` from ``rows`` (at most ``C`` rows; an edge chunk is padded with the fill value)."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if len(rows) < self.C:
            full = np.full((self.C, *self.row_shape), self.fill, self.dtype)
            full[: len(rows)] = rows
            rows = full
        p = self.base / self._key((c,) + (0,) * len(self.row_shape))
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            f.write(memoryview(rows).cast("B"))


class ChunkWriter:
    """Buffers rows and writes whole chunks of a zarr array (no read-modify-write)."""

    def __init__(self, arr: Any, chunk: int) -> None:
        self.arr = arr
        self.chunk = chunk
        self.buf = np.empty((chunk,) + tuple(arr.shape[1:]), arr.dtype)
        self.fill = 0
        self.pos = 0

    def add(self, rows: np.ndarray) -> None:
        i = 0
        while i < len(rows):
            take = min(self.chunk - self.fill, len(rows) - i)
            self.buf[self.fill:self.fill + take] = rows[i:i + take]
            self.fill += take
            i += take
            if self.fill == self.chunk:
                self.flush()

    def flush(self) -> None:
        if self.fill:
            self.arr[self.pos:self.pos + self.fill] = self.buf[:self.fill]
            self.pos += self.fill
            self.fill = 0
