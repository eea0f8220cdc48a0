"""Whole-chunk reads and writes of the zarr arrays the pipeline writes (tile images, token arrays).

Chunks of the writers' plain layout (zarr v3, bytes [+ one Blosc codec], no sharding, local store,
chunks spanning every axis but the first) are read straight from their files and decoded into a
caller's buffer: no zarr event-loop round trip, no intermediate copy. Anything else falls back to
zarr slicing.
"""

from __future__ import annotations

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
