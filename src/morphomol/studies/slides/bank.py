"""Per-slide embeddings (rule ``slides_embed``): all that the slides study's fold and transfer jobs read of H&E.

One zarr v3 group per slide, ``slides/embeddings/{group}/{sample}.zarr`` (``group{k}``: the cohort's slides in
groups of ``slides.tiling.group_size``, sheet order; one job per group writes the group's directory), written
from the slide's feature store (``features/{encoder}/{sample}.zarr``) and nothing else:

* ``mean``       (D,) float32: the mean of *all* the slide's tile features (the ``mean`` setting's input);
* ``bag``        (T, D) float16: the slide's ABMIL bag — every tile when it has at most ``abmil_max_tiles``
                 tiles, else the seeded subset (``default_rng([seed, *sample bytes])``, rows kept in store
                 order) of ``abmil_max_tiles`` tiles; uncompressed, one chunk (read straight from its file);
* ``bag_index``  (T,) int64: the feature-store rows of the bag's tiles (unit ``{sample}__{row:06d}``);
* attrs: ``format``, ``sample``, ``n_tiles`` (tiles of the slide), ``n_bag``, ``dim``, ``max_tiles``,
  ``seed``, ``features`` (the store read), ``encoder``, ``weights_sha256``.

The artifact is a tile index as much as a bag: ``bag_index`` + ``n_tiles`` + ``features`` let a trainer
resample bags from the feature store each iteration (TANGLE-style), and further arrays (a larger pool of tiles,
their index) can be added beside ``bag`` without changing what today's jobs read.

Readers: :class:`SlideBank` (per-slide metadata once, the N x D matrix of means — the cohort's summary — and
bags per batch of slides, never every bag at once) and :class:`BagSet` (a view over some of the bank's slides,
optionally through a projection, padded to the bank's bag length ``T`` = the largest bag of the cohort).
Torch-free.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("slides.bank")

FORMAT = "morphomol-slide-embedding/1"
MEAN, BAG, BAG_INDEX = "mean", "bag", "bag_index"
_DTYPES = {MEAN: "float32", BAG: "float16", BAG_INDEX: "int64"}


# --------------------------------------------------------------------------------------------- writing
def bag_rows(n_tiles: int, sample: str, *, max_tiles: int, seed: int = 0) -> np.ndarray:
    """Store rows of a slide's bag: all ``n_tiles`` rows, or a seeded subset of ``max_tiles`` (sorted)."""
    if n_tiles <= max_tiles:
        return np.arange(n_tiles, dtype=np.int64)
    rng = np.random.default_rng([int(seed), *str(sample).encode()])
    return np.sort(rng.choice(n_tiles, size=int(max_tiles), replace=False)).astype(np.int64)


def write_slide_embedding(out: str | Path, *, sample: str, mean: np.ndarray, bag: np.ndarray, index: np.ndarray,
                          n_tiles: int, max_tiles: int, seed: int, source: Mapping[str, Any] | None = None) -> Path:
    """One slide's embedding group (see the module doc), written atomically."""
    import zarr

    from morphomol.util.atomic import atomic_path

    bag = np.ascontiguousarray(bag, dtype=np.float16)
    mean = np.ascontiguousarray(mean, dtype=np.float32)
    index = np.ascontiguousarray(index, dtype=np.int64)
    if bag.ndim != 2 or bag.shape[0] != len(index) or bag.shape[1] != len(mean):
        raise ValueError(f"bag {bag.shape}, index {index.shape} and mean {mean.shape} do not agree")
    with atomic_path(out) as tmp:
        g = zarr.open_group(str(tmp), mode="w")
        for name, arr in ((MEAN, mean), (BAG, bag), (BAG_INDEX, index)):
            a = g.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=tuple(max(1, s) for s in arr.shape),
                               compressors=None)
            if arr.size:
                a[...] = arr
        g.attrs.update({"format": FORMAT, "sample": str(sample), "n_tiles": int(n_tiles), "n_bag": int(len(index)),
                        "dim": int(len(mean)), "max_tiles": int(max_tiles), "seed": int(seed), **dict(source or {})})
    return Path(out)


def embed_slide(features: str | Path, out: str | Path, *, sample: str, max_tiles: int, seed: int = 0) -> dict[str, Any]:
    """The embedding of one slide from its feature store (reads that store only)."""
    from morphomol.data.features import read_features

    f, attrs = read_features(features)
    if len(f) == 0:
        raise InputError(f"slide {sample} has no tiles in its features store", file=features, field="features",
                         expected="at least one tile feature")
    f = np.asarray(f, np.float32)
    rows = bag_rows(len(f), sample, max_tiles=max_tiles, seed=seed)
    source = {"features": str(features), "encoder": str(attrs.get("encoder", "")),
              "weights_sha256": str(attrs.get("weights_sha256", ""))}
    write_slide_embedding(out, sample=sample, mean=f.mean(axis=0), bag=f[rows], index=rows, n_tiles=len(f),
                          max_tiles=max_tiles, seed=seed, source=source)
    return {"sample": sample, "n_tiles": int(len(f)), "n_bag": int(len(rows)), "dim": int(f.shape[1])}


def embed_slides(*, features: Sequence[str | Path], samples: Sequence[str], out_dir: str | Path, max_tiles: int,
                 seed: int = 0) -> list[dict[str, Any]]:
    """The ``slides_embed`` rule of one group: ``out_dir/{sample}.zarr`` for each slide (the directory is
    replaced only when every slide succeeded). One slide's features in memory at a time."""
    from morphomol.util.atomic import atomic_path

    if len(features) != len(samples):
        raise ValueError(f"{len(features)} feature stores for {len(samples)} samples")
    t0 = time.perf_counter()
    out = []
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        for s, f in zip(samples, features, strict=True):
            out.append(embed_slide(f, tmp / f"{s}.zarr", sample=s, max_tiles=max_tiles, seed=seed))
    dims = {r["dim"] for r in out}
    if len(dims) > 1:
        raise InputError(f"feature stores of different dimensions {sorted(dims)}", field="features",
                         expected="one encoder for every slide")
    log.info("embedded %d slides (%d tiles, bags of <= %d) in %.1f s", len(out), sum(r["n_tiles"] for r in out),
             max_tiles, time.perf_counter() - t0)
    return out


# --------------------------------------------------------------------------------------------- reading
def embedding_path(group_dir: str | Path, sample: str) -> Path:
    """The embedding of ``sample`` inside its group's directory."""
    return Path(group_dir) / f"{sample}.zarr"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError("slide embedding incomplete (missing zarr.json)", file=path.parent,
                         expected="a slide embedding written by the slides_embed rule") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path.name} ({type(exc).__name__}: {exc})", file=path.parent) from None


class _Array:
    """One array of a slide embedding: read straight from its single chunk file when the layout is the
    writer's plain one (one chunk, bytes codec, little endian, default chunk keys), else through zarr."""

    __slots__ = ("path", "shape", "dtype", "chunk")

    def __init__(self, path: Path, name: str) -> None:
        meta = _read_json(path / "zarr.json")
        self.path = path
        self.shape = tuple(int(x) for x in meta.get("shape", ()))
        self.dtype = np.dtype(str(meta.get("data_type", "")) or "float32")
        if str(meta.get("data_type")) != _DTYPES[name]:
            raise InputError(f"array '{name}' has data type {meta.get('data_type')}", file=path.parent,
                             field=name, expected=_DTYPES[name])
        codecs = meta.get("codecs") or []
        grid = (meta.get("chunk_grid") or {}).get("configuration", {}).get("chunk_shape")
        keys = meta.get("chunk_key_encoding") or {}
        plain = (len(codecs) == 1 and codecs[0].get("name") == "bytes"
                 and (codecs[0].get("configuration") or {}).get("endian", "little") == "little"
                 and grid is not None and [int(x) for x in grid] == [max(1, s) for s in self.shape]
                 and keys.get("name") == "default" and (keys.get("configuration") or {}).get("separator", "/") == "/"
                 and np.little_endian)
        self.chunk = path.joinpath("c", *(["0"] * len(self.shape))) if plain else None

    def read(self) -> np.ndarray:
        n = int(np.prod(self.shape))
        if self.chunk is not None:
            if n == 0:
                return np.zeros(self.shape, self.dtype)
            try:
                a = np.fromfile(self.chunk, dtype=self.dtype)
            except FileNotFoundError:  # never written: all fill value (zeros)
                return np.zeros(self.shape, self.dtype)
            if a.size == n:
                return a.reshape(self.shape)
        import zarr

        return np.asarray(zarr.open_array(str(self.path), mode="r")[...], dtype=self.dtype)


class SlideBank:
    """The slide embeddings of ``samples`` (in that order; ``paths``: sample -> its ``.zarr``)."""

    def __init__(self, paths: Mapping[str, str | Path], samples: Sequence[str]) -> None:
        self.samples = [str(s) for s in samples]
        missing = [s for s in self.samples if s not in paths]
        if missing:
            raise InputError(f"no slide embedding for {len(missing)} slide(s): {', '.join(missing[:5])}",
                             field="embeddings", expected="an embedding per slide (rule slides_embed)")
        self.paths = [Path(paths[s]) for s in self.samples]
        self._mean: list[_Array] = []
        self._bag: list[_Array] = []
        n_bag, n_tiles, dims = [], [], []
        for s, p in zip(self.samples, self.paths, strict=True):
            if not p.is_dir():
                raise InputError(f"slide embedding of {s} not found", file=p,
                                 expected="a slide embedding written by the slides_embed rule")
            attrs = _read_json(p / "zarr.json").get("attributes") or {}
            if attrs.get("format") != FORMAT or str(attrs.get("sample")) != s:
                raise InputError(f"not the embedding of slide {s} (format {attrs.get('format')!r}, sample "
                                 f"{attrs.get('sample')!r})", file=p, field="sample", expected=f"{FORMAT} of {s}")
            mean, bag = _Array(p / MEAN, MEAN), _Array(p / BAG, BAG)
            if len(bag.shape) != 2 or mean.shape != (bag.shape[1],) or bag.shape[0] < 1:
                raise InputError(f"bag {bag.shape} and mean {mean.shape} do not agree", file=p, field=BAG,
                                 expected="bag (T >= 1, D), mean (D,)")
            self._mean.append(mean)
            self._bag.append(bag)
            n_bag.append(bag.shape[0])
            n_tiles.append(int(attrs.get("n_tiles", bag.shape[0])))
            dims.append(bag.shape[1])
        if len(set(dims)) > 1:
            i = next(i for i, d in enumerate(dims) if d != dims[0])
            raise InputError(f"slide embeddings of different dimensions ({dims[0]} for {self.samples[0]}, {dims[i]})",
                             file=self.paths[i], field="dim", expected="one encoder for every slide")
        self.dim = int(dims[0]) if dims else 0
        self.n_bag = np.asarray(n_bag, np.int64)
        self.n_tiles = np.asarray(n_tiles, np.int64)
        self.T = int(self.n_bag.max()) if len(self.n_bag) else 0

    def __len__(self) -> int:
        return len(self.samples)

    def means(self) -> np.ndarray:
        """(N, D) float32: every slide's mean tile vector."""
        out = np.empty((len(self), self.dim), np.float32)
        for i, a in enumerate(self._mean):
            out[i] = a.read()
        return out

    def bag(self, i: int) -> np.ndarray:
        """(n_bag_i, D) float16: the bag of slide ``i``."""
        return self._bag[int(i)].read()

    def bags(self, rows: Sequence[int] | np.ndarray) -> BagSet:
        return BagSet(self, np.asarray(rows, np.int64))

    def all_bags(self) -> BagSet:
        return BagSet(self, np.arange(len(self), dtype=np.int64))


class BagSet:
    """Bags of some slides of a :class:`SlideBank` (``rows``: bank rows, in order), optionally projected by
    ``transform`` ((n, D) float32 -> (n, D') float32, applied to real tiles only; padding stays zero).

    ``read(idx)`` gives ``(bag (B, T, D') float32, mask (B, T) bool)`` for positions ``idx`` of this set,
    padded to the bank's ``T``; ``tiles(chunk_rows)`` iterates over the real tiles of the set's slides."""

    def __init__(self, bank: SlideBank, rows: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None = None,
                 dim: int | None = None) -> None:
        self.bank, self.rows, self.transform = bank, np.asarray(rows, np.int64), transform
        self.dim = int(dim if dim is not None else bank.dim)
        self.T = bank.T

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, idx: np.ndarray | Sequence[int]) -> BagSet:
        return BagSet(self.bank, self.rows[np.asarray(idx, np.int64)], self.transform, self.dim)

    def with_transform(self, transform: Callable[[np.ndarray], np.ndarray], dim: int) -> BagSet:
        return BagSet(self.bank, self.rows, transform, dim)

    def read(self, idx: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(idx, np.int64)
        bag = np.zeros((len(idx), self.T, self.dim), np.float32)
        mask = np.zeros((len(idx), self.T), bool)
        for j, i in enumerate(idx):
            b = self.bank.bag(self.rows[i])
            x = b.astype(np.float32)
            bag[j, :len(b)] = self.transform(x) if self.transform is not None else x
            mask[j, :len(b)] = True
        return bag, mask

    def n_tiles(self) -> int:
        """Real (unpadded) tiles over the set's bags."""
        return int(self.bank.n_bag[self.rows].sum())

    def tiles(self, chunk_rows: int = 4096, *, raw: bool = False) -> Iterator[np.ndarray]:
        """Real tiles of the set's bags, slide after slide, in blocks of about ``chunk_rows`` rows (float32,
        through ``transform`` unless ``raw``)."""
        buf: list[np.ndarray] = []
        n = 0
        for r in self.rows:
            x = self.bank.bag(r).astype(np.float32)
            if self.transform is not None and not raw:
                x = self.transform(x)
            buf.append(x)
            n += len(x)
            if n >= chunk_rows:
                yield np.concatenate(buf) if len(buf) > 1 else buf[0]
                buf, n = [], 0
        if buf:
            yield np.concatenate(buf) if len(buf) > 1 else buf[0]


def tile_moments(bags: BagSet, *, raw: bool = False, chunk_rows: int = 4096) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, population SD, n) per dimension over the real tiles of ``bags`` (float64 sums, shifted by the first
    block's mean so that the sums do not cancel)."""
    shift = s1 = s2 = None
    n = 0
    for x in bags.tiles(chunk_rows, raw=raw):
        x = np.asarray(x, np.float64)
        if shift is None:
            shift = x.mean(axis=0)
            s1 = np.zeros_like(shift)
            s2 = np.zeros_like(shift)
        d = x - shift
        s1 += d.sum(axis=0)
        s2 += (d * d).sum(axis=0)
        n += len(x)
    if shift is None or n == 0:
        raise InputError("no tiles in the bags of the training slides", field="slides", expected="at least one tile")
    m = s1 / n
    var = np.maximum(s2 / n - m * m, 0.0)
    return shift + m, np.sqrt(var), n


def tile_covariance(bags: BagSet, *, chunk_rows: int = 4096) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean (D,), covariance (D, D) with 1/n, n) of the raw real tiles of ``bags``, accumulated in blocks of
    about ``chunk_rows`` tiles as float64 sums (shifted by the first block's mean): memory O(D² + block)."""
    shift = s1 = s2 = None
    n = 0
    for x in bags.tiles(chunk_rows, raw=True):
        x = np.asarray(x, np.float64)
        if shift is None:
            shift = x.mean(axis=0)
            s1 = np.zeros_like(shift)
            s2 = np.zeros((len(shift), len(shift)))
        d = x - shift
        s1 += d.sum(axis=0)
        s2 += d.T @ d
        n += len(x)
    if shift is None or n == 0:
        raise InputError("no tiles in the bags of the training slides", field="slides", expected="at least one tile")
    m = s1 / n
    cov = s2 / n - np.outer(m, m)
    return shift + m, (cov + cov.T) / 2.0, n
