"""A fold of the fusion study as batch sources over the declared stores (explicit paths only).

:class:`FoldInputs` is exactly what the train rules declare: the fold's split and panel, the tile
image store and token store of every sample, the cached features of the setting's frozen encoders.
:func:`fold_from_stores` turns them into :class:`FoldData` (fit / val / test sources + genes);
:func:`attach_features` adds cached frozen features (``morph_feat`` / ``expr_feat``) to the sources.
Targets (log1p add-on counts) and core counts come from one artifact: the ``tile_counts`` of each
sample's ``tokens.zarr``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from morphomol.data.folds import read_fold_panel, read_folds, unit_split
from morphomol.data.stores import StorePaths
from morphomol.errors import InputError
from morphomol.studies.fusion.settings import IN_MODEL_ENCODER, ModelSetting
from morphomol.train.runtime import autocast, to_device
from morphomol.train.sources import BatchSource, WithFeatures
from morphomol.util.logs import get_logger

log = get_logger("fusion.data")

PARTITIONS = ("fit", "val", "test")


@dataclass(frozen=True)
class FoldInputs:
    """The declared inputs of one fusion run (every path explicit)."""

    folds: Path                                # splits/folds.parquet (one row per fold x sample)
    fold: int
    panel: Path
    tokens: Mapping[str, Path]                 # sample -> tokens.zarr (the samples' order is the split's)
    tiles: Mapping[str, Path] = field(default_factory=dict)   # sample -> images.zarr (settings that read images)
    features: Mapping[str, Mapping[str, Path]] = field(default_factory=dict)  # encoder -> sample -> features zarr
    vit_weights: Path | None = None
    #: sample -> tiles.parquet / units.h5ad naming the units; by default the token store's rows, named by the
    #: tile-id contract (``morphomol.tiling.tile_ids``), so a run declares no per-sample table besides its stores
    units: Mapping[str, Path] = field(default_factory=dict)

    def stores(self) -> dict[str, StorePaths]:
        return {s: StorePaths(Path(p), Path(self.tiles[s]) if s in self.tiles else None) for s, p in self.tokens.items()}

    def split(self) -> Any:
        """The unit-level split of the fold (``tile_id, sample_id, patient_id, index, partition``), samples in
        the order of :attr:`tokens`, units in store order."""
        from morphomol.data.stores import token_store_unit_ids

        ids = {s: store_unit_ids(self.units[s]) if s in self.units else token_store_unit_ids(p)
               for s, p in self.tokens.items()}
        return unit_split(read_folds(self.folds), int(self.fold), ids, file=self.folds)

    def artifacts(self) -> dict[str, Path]:
        """Every declared input by name (the resume fingerprint digests these)."""
        out: dict[str, Path] = {"folds": Path(self.folds), "panel": Path(self.panel)}
        out.update({f"units/{s}": Path(p) for s, p in self.units.items()})
        out.update({f"tokens/{s}": Path(p) for s, p in self.tokens.items()})
        out.update({f"tiles/{s}": Path(p) for s, p in self.tiles.items()})
        for enc, per in self.features.items():
            out.update({f"features/{enc}/{s}": Path(p) for s, p in per.items()})
        if self.vit_weights is not None:
            out["vit_weights"] = Path(self.vit_weights)
        return out


def store_unit_ids(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(unit ids, row in the sample's stores) of a sample: only the ``tile_id, index`` columns of its
    ``tiles.parquet``, or the obs index (+ ``index``) of a ``units.h5ad`` (X is not read)."""
    p = Path(path)
    if p.suffix == ".h5ad":
        from morphomol.data.units import unit_ids

        return unit_ids(p)
    if not p.exists():
        raise InputError("tile table not found", file=p, expected="tiles.parquet written by the tile rule")
    import pyarrow.parquet as pq

    names = set(pq.ParquetFile(p).schema_arrow.names)
    if "tile_id" not in names:
        raise InputError("tile table has no 'tile_id' column", file=p, field="tile_id",
                         expected="tiles.parquet written by the tile rule")
    t = pq.read_table(p, columns=["tile_id"] + (["index"] if "index" in names else []))
    ids = np.asarray(t.column("tile_id").to_pylist(), dtype=object).astype(str)
    index = (t.column("index").to_numpy().astype(np.int64) if "index" in names
             else np.arange(len(ids), dtype=np.int64))
    return ids, index


class StoreSplit:
    """One partition of a fold read from the tile/token stores through :mod:`morphomol.data.loader`.

    Chunk-shuffled batches (``make_loader``), renamed to the trainer's contract (``tile_counts`` ->
    ``tile``, ``targets`` -> ``target``); images / tokens are only read when a field asks for them.
    Loaders are kept per layout (persistent workers, the feed's threads' decode state and buffers).

    ``epoch(..., device=, threads=)`` (the options in :attr:`epoch_options`): with ``device`` the
    batches arrive on that device, tokens scattered there from COO; with ``threads`` as well they
    come from the threaded feed (:mod:`morphomol.data.feed`, reused (pinned) buffers, a batch is
    valid until the next one is asked for). ``shard=(rank, world)``: this process's part of every
    batch (data-parallel training). ``skip`` drops the first batches in the plan (nothing is read).
    """

    #: optional keywords of :meth:`epoch` (the trainer passes only what a source supports)
    epoch_options = frozenset({"device", "threads", "shard"})

    def __init__(self, split: Any, panel: Mapping[str, Any], stores: Mapping[str, StorePaths], partition: str, *,
                 buffer_chunks: int = 8, buffer_batches: int = 0,
                 features: Mapping[str, Mapping[str, Path]] | None = None) -> None:
        self.split, self.stores, self.partition = split, dict(stores), partition
        self.panel = {"core": list(panel["core"]), "addon": list(panel["addon"])}
        self.buffer_chunks, self.buffer_batches = int(buffer_chunks), int(buffer_batches)
        self.tile_ids = split.loc[split["partition"] == partition, "tile_id"].astype(str).tolist()
        #: field (``morph_feat`` / ``expr_feat``) -> sample -> features zarr, read per chunk with the tiles
        self.features: dict[str, dict[str, Path]] = {k: dict(v) for k, v in (features or {}).items()}
        self._loaders: dict[tuple[Any, ...], Any] = {}

    def with_features(self, name: str, paths: Mapping[str, Path]) -> int:
        """Serve cached features of ``paths`` (sample -> features zarr) as batch field ``name``; checks
        the stores (every sample of the partition, enough rows, one width) and returns the width D."""
        from morphomol.data.features import check_feature_stores

        part = self.split[self.split["partition"] == self.partition]
        need = part.groupby(part["sample_id"].astype(str), sort=False)["index"].max()
        dim = check_feature_stores(paths, {s: int(i) + 1 for s, i in need.items()})
        self.features[name] = {s: Path(paths[s]) for s in need.index}
        self._loaders.clear()
        return dim

    def __len__(self) -> int:
        return len(self.tile_ids)

    def n_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last and n >= batch_size else -(-n // batch_size)

    def epoch(self, epoch: int, *, batch_size: int, fields: Sequence[str], seed: int = 0, shuffle: bool = True,
              drop_last: bool = False, skip: int = 0, num_workers: int = 0, pin_memory: bool = False,
              device: Any = None, threads: int | None = None,
              shard: tuple[int, int] | None = None) -> Iterator[dict[str, Any]]:
        from morphomol.data.loader import TileStream, densify_tokens, make_loader

        images, tokens = "image" in fields, "tokens" in fields
        feats = {f: self.features[f] for f in fields if f in self.features}
        fkey = tuple(sorted(feats))
        drop_last = drop_last and len(self) >= batch_size  # as epoch_batches: never drop the only batch
        if device is not None and threads is not None:
            from morphomol.data.feed import Feed

            key: tuple[Any, ...] = ("feed", batch_size, seed, shuffle, drop_last, images, tokens, int(threads),
                                    str(device), fkey)
            if key not in self._loaders:
                stream = TileStream(self.split, self.panel, self.stores, self.partition, batch_size=batch_size,
                                    shuffle=shuffle, seed=seed, buffer_chunks=self.buffer_chunks, drop_last=drop_last,
                                    images=images, tokens=tokens, buffer_batches=self.buffer_batches, features=feats)
                self._loaders[key] = Feed(stream, threads=int(threads), device=device)
            batches = self._loaders[key].epoch(epoch, skip=skip, shard=shard)
        else:
            key = (batch_size, seed, shuffle, drop_last, images, tokens, num_workers, pin_memory, fkey)
            if key not in self._loaders:
                self._loaders[key] = make_loader(
                    self.split, self.panel, self.stores, self.partition, batch_size=batch_size, shuffle=shuffle,
                    seed=seed, num_workers=num_workers, buffer_chunks=self.buffer_chunks, drop_last=drop_last,
                    images=images, tokens=tokens, pin_memory=pin_memory, buffer_batches=self.buffer_batches,
                    token_format="coo", features=feats)  # sparse tokens cross the worker pipe; densified on `device`
            loader = self._loaders[key]
            loader.set_epoch(epoch, skip=skip, shard=shard)  # a resume's consumed batches: skipped unread
            batches = iter(loader)
        for b in batches:
            out: dict[str, Any] = {"tile_id": b["tile_id"]}
            if images:
                out["image"] = b["image"]
            if tokens:
                out["tokens"] = densify_tokens(b, device)
            if "tile" in fields:
                out["tile"] = b["tile_counts"]
            if "target" in fields:
                out["target"] = b["targets"]
            for f in feats:
                out[f] = b[f] if device is None else b[f].to(device, non_blocking=True)
            yield out


@dataclass
class FoldData:
    """The three partitions of one fold, the fold's panel and the cached features it may use."""

    fit: BatchSource
    val: BatchSource
    test: BatchSource
    core_genes: list[str]
    addon_genes: list[str]
    #: encoder -> sample_id -> features zarr
    feature_paths: dict[str, dict[str, Path]] = field(default_factory=dict)

    def partitions(self) -> dict[str, BatchSource]:
        return {"fit": self.fit, "val": self.val, "test": self.test}


def fold_from_stores(inputs: FoldInputs, *, buffer_chunks: int = 8, buffer_batches: int = 0) -> FoldData:
    """:class:`FoldData` over the declared stores of one fold (``buffer_batches``: see ``TileStream``)."""
    panel = read_fold_panel(inputs.panel)
    split = inputs.split()
    stores = inputs.stores()
    parts = {p: StoreSplit(split, panel, stores, p, buffer_chunks=buffer_chunks, buffer_batches=buffer_batches)
             for p in PARTITIONS}
    # a fold whose validation policy is none (splits.validation; e.g. one training sample) has no val tiles:
    # its trainers run fixed epochs without early stopping
    policy = str(split.attrs.get("validation", "patient"))
    for p, ds in parts.items():
        if len(ds) == 0 and not (p == "val" and policy == "none"):
            raise InputError(f"fold {inputs.fold} has no '{p}' tiles (validation {policy})", file=inputs.folds,
                             field="partition", expected="fit and test tiles in every fold, val tiles unless the "
                             "fold's validation policy is none")
    return FoldData(parts["fit"], parts["val"], parts["test"], list(panel["core"]), list(panel["addon"]),
                    {k: {s: Path(p) for s, p in v.items()} for k, v in inputs.features.items()})


@torch.no_grad()
def frozen_vit_features(vit: torch.nn.Module, ds: BatchSource, batch_size: int, device: torch.device) -> np.ndarray:
    """CLS embeddings of a frozen ViT, computed once per tile, rows in ``ds.tile_ids`` order
    (used when no features cache is given)."""
    vit = vit.to(device).eval()
    out, ids = [], []
    for batch in ds.epoch(0, batch_size=batch_size, fields=["image"], shuffle=False):
        ids += list(batch["tile_id"])
        batch = to_device(batch, device)
        with autocast(device):
            out.append(vit(batch["image"]).float().cpu())
    feats = torch.cat(out).numpy()
    pos = {t: i for i, t in enumerate(ids)}
    return feats[np.array([pos[t] for t in ds.tile_ids], dtype=np.int64)]


def attach_features(setting: ModelSetting, data: FoldData, *, vit: Any, batch_size: int, seed: int,
                    device: torch.device) -> tuple[dict[str, BatchSource], int | None, int | None, dict[str, Any]]:
    """Wrap the partitions with cached frozen features when the setting uses them.

    Returns (sources, morph_dim, expr_dim, info). Store-backed partitions (:class:`StoreSplit`) read the
    cached features per chunk, with their tiles (nothing is held but the loader's chunk buffers); other
    sources (in-memory tiles) get their rows in memory. ``vit`` builds the frozen ViT-S when its features
    must be computed here (no cache given): a callable returning the module.
    """
    from morphomol.data.features import feature_rows

    splits: dict[str, BatchSource] = data.partitions()
    feats: dict[str, dict[str, np.ndarray]] = {k: {} for k in splits}
    info: dict[str, Any] = {}
    morph_dim = expr_dim = None
    for key, enc in (("morph_feat", setting.morph_cache), ("expr_feat", setting.expr_cache)):
        if enc is None:
            continue
        dim = None
        if enc in data.feature_paths:
            for k, ds in splits.items():
                if len(ds) == 0:  # an empty val partition (validation policy none): nothing to attach
                    continue
                if isinstance(ds, StoreSplit):
                    dim = ds.with_features(key, data.feature_paths[enc])
                else:
                    feats[k][key] = feature_rows(data.feature_paths[enc], ds.tile_ids)
                    dim = feats[k][key].shape[1]
            info[enc] = "cache"
        elif enc == IN_MODEL_ENCODER:
            torch.manual_seed(seed)
            model = vit()
            for k, ds in splits.items():
                if len(ds):  # an empty val partition (validation policy none): nothing to compute
                    feats[k][key] = frozen_vit_features(model, ds, batch_size, device)
            dim = feats["fit"][key].shape[1]
            info[enc] = "computed"
            log.info("computed frozen %s features once per tile (%d tiles)", enc, sum(len(s) for s in splits.values()))
        else:
            raise InputError(f"setting '{setting.name}' needs cached '{enc}' features",
                             field=f"features/{enc}", expected="results/{cohort}/features/" + enc + "/{sample}.zarr")
        morph_dim, expr_dim = (dim, expr_dim) if key == "morph_feat" else (morph_dim, dim)
    if any(feats[k] for k in feats):
        splits = {k: WithFeatures(ds, feats[k]) if feats[k] else ds for k, ds in splits.items()}
    return splits, morph_dim, expr_dim, info


def target_mean(ds: BatchSource, batch_size: int = 4096) -> np.ndarray:
    """Mean over the partition of the ``target`` field, streamed batch by batch (memory: one batch + G).

    Bit for bit ``gather(ds, ["target"])["target"].mean(axis=0)``: the same batches in the same order,
    summed row by row in float32 (what numpy's axis-0 reduction of an (N, G) array with G >= 2 does)
    and divided as ``np.mean`` divides; a single target (G = 1, summed pairwise by numpy) keeps its one
    column (N floats) and takes ``np.mean`` of it."""
    acc: np.ndarray | None = None
    column: list[np.ndarray] = []
    n = 0
    for b in ds.epoch(0, batch_size=batch_size, fields=["target"], shuffle=False):
        t = np.asarray(b["target"], dtype=np.float32)
        n += len(t)
        if t.ndim != 2 or t.shape[1] == 1:
            column.append(t.copy())
            continue
        # sequential: acc + row_0 + row_1 + ... (the reduction of [acc; batch] along axis 0)
        acc = np.add.reduce(np.concatenate([acc[None] if acc is not None else t[:0], t]), axis=0)
    if column or acc is None:
        return np.concatenate(column).mean(axis=0) if column else np.zeros((0,), np.float32).mean(axis=0)
    np.true_divide(acc, np.intp(n), out=acc, casting="unsafe")
    return acc
