"""The trainer (resumable), the Min-MAE baseline and CLIP training.

Read top to bottom:

1. ``TrainConfig``        — the ``training`` config section (+ seed, threads, device).
2. Data                   — the batch contract, ``InMemoryTiles``, feature caches, epoch order.
3. Schedule               — linear warm-up then cosine to ``min_lr``, per optimizer step.
4. Preemption             — SIGTERM sets a flag; the next step boundary writes ``resume.pt``
                            and raises :class:`Preempted` (exit code 143).
5. ``fit``                — the loop: AdamW (two lr groups), grad-norm clip, bf16 autocast on CUDA,
                            validation per epoch, early stopping on the validation metric.
                            (Regression heads start with their bias at the fit-set target mean.)
6. ``train_setting``      — one Table A.1 run → metrics.json, predictions.parquet, checkpoint.
7. ``run_min_mae``        — the Min-MAE baseline (CPU).
8. ``train_clip``         — CLIP pretraining + recall@k (Table A.2).

Batch contract (what a dataset's ``get_batch(indices, fields)`` returns, a dict of tensors):
``image`` uint8 (B, 224, 224, 3); ``tokens`` float32 (B, 196, G_core) raw counts; ``tile``
float32 (B, G_core) raw tile-level core counts; ``target`` float32 (B, G_addon) already log1p;
``tile_id`` list[str]. Models apply ``log1p`` to counts themselves. Settings on cached frozen
features get ``morph_feat`` / ``expr_feat`` float32 (B, D) added (and never read images).

Determinism and resuming: the order of the fit tiles in epoch ``e`` depends only on
``(seed, e)``; a resumed run restores model, optimizer, schedule position, RNG states, best
state and early-stopping counters, skips the batches of the interrupted epoch that were
already consumed, and therefore ends (on CPU, where deterministic algorithms are enforced)
with bit-identical weights and metrics to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from morphomol import evaluation
from morphomol.util.atomic import atomic_path
from morphomol.errors import InputError
from morphomol.util.logs import get_logger
from morphomol.models import (
    N_TOKENS,
    ClipModel,
    ModelSetting,
    ViTEncoder,
    as_setting,
    build_clip_model,
    build_model,
    clip_loss,
    encoder_weights,
    missing_weights,
)

log = get_logger("training")

RESUME_NAME = "resume.pt"
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what SLURM/Snakemake see for a terminated job


# =========================================================================== 1. config


@dataclass
class TrainConfig:
    """Config ``training`` section plus ``seed``; unknown keys are ignored (other stages may add some)."""

    epochs: int = 35
    warmup_epochs: int = 5
    batch_size: int = 256
    lr_head: float = 1e-4
    lr_backbone: float = 1e-5
    min_lr: float = 1e-6
    weight_decay: float = 1e-3
    grad_clip: float = 1.0
    patience: int = 10
    num_workers: int = 0
    clip_batch_size: int = 256
    seed: int = 0
    threads: int | None = None
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False

    @classmethod
    def from_config(cls, training: Mapping[str, Any] | None, seed: int = 0, **overrides: Any) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in dict(training or {}).items() if k in names}
        kw["seed"] = seed
        kw.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(**kw)
        for key in ("epochs", "batch_size", "clip_batch_size"):
            if int(getattr(cfg, key)) < 1:
                raise InputError(f"must be >= 1, got {getattr(cfg, key)}", field=f"training.{key}")
        return cfg

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


# =========================================================================== 2. data


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
              drop_last: bool = False, skip: int = 0, num_workers: int = 0,
              pin_memory: bool = False) -> Iterable[dict[str, Any]]:
        batches = epoch_batches(self, batch_size, seed, epoch, shuffle=shuffle, drop_last=drop_last)[skip:]
        if num_workers <= 0 or not batches:
            return (self.get_batch(b, fields) for b in batches)
        return torch.utils.data.DataLoader(_BatchList(self, batches, fields), batch_size=None, shuffle=False,
                                           num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=4)

    def subset(self, idx: np.ndarray) -> InMemoryTiles:
        idx = np.asarray(idx)
        return InMemoryTiles([self.tile_ids[i] for i in idx], **{k: v[idx] for k, v in self.arrays.items()})


class StoreSplit:
    """One partition of a fold read from the tile/token stores through :mod:`morphomol.store`.

    Chunk-shuffled batches (``store.make_loader``), renamed to the trainer's contract
    (``tile_counts`` -> ``tile``, ``targets`` -> ``target``); images / tokens are only read when
    a field asks for them. Loaders are kept per layout (persistent workers).
    """

    def __init__(self, cohort_dir: str | Path, fold: int, partition: str, panel: Mapping[str, Any], *,
                 buffer_chunks: int = 8) -> None:
        from morphomol import store

        self.cohort_dir, self.fold, self.partition = Path(cohort_dir), int(fold), partition
        self.panel = {"core": list(panel["core"]), "addon": list(panel["addon"])}
        self.buffer_chunks = int(buffer_chunks)
        split = store.load_split(self.cohort_dir, self.fold)
        self.tile_ids = split.loc[split["partition"] == partition, "tile_id"].astype(str).tolist()
        self._loaders: dict[tuple[Any, ...], Any] = {}

    def __len__(self) -> int:
        return len(self.tile_ids)

    def n_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last and n >= batch_size else -(-n // batch_size)

    def epoch(self, epoch: int, *, batch_size: int, fields: Sequence[str], seed: int = 0, shuffle: bool = True,
              drop_last: bool = False, skip: int = 0, num_workers: int = 0,
              pin_memory: bool = False) -> Iterator[dict[str, Any]]:
        from morphomol import store

        images, tokens = "image" in fields, "tokens" in fields
        drop_last = drop_last and len(self) >= batch_size  # as epoch_batches: never drop the only batch
        key = (batch_size, seed, shuffle, drop_last, images, tokens, num_workers, pin_memory)
        if key not in self._loaders:
            self._loaders[key] = store.make_loader(
                self.cohort_dir, self.fold, self.partition, self.panel, batch_size=batch_size, shuffle=shuffle,
                seed=seed, num_workers=num_workers, buffer_chunks=self.buffer_chunks, drop_last=drop_last,
                images=images, tokens=tokens, pin_memory=pin_memory,
                token_format="coo")  # sparse tokens cross the worker pipe; densified here
        loader = self._loaders[key]
        loader.set_epoch(epoch)
        for i, b in enumerate(loader):
            if i < skip:  # resuming mid-epoch: these batches were consumed before the interruption
                continue
            out: dict[str, Any] = {"tile_id": b["tile_id"]}
            if images:
                out["image"] = b["image"]
            if tokens:
                out["tokens"] = store.densify_tokens(b)
            if "tile" in fields:
                out["tile"] = b["tile_counts"]
            if "target" in fields:
                out["target"] = b["targets"]
            yield out


class WithFeatures:
    """A partition plus cached per-tile features (``morph_feat`` / ``expr_feat``), rows aligned to ``tile_ids``."""

    def __init__(self, base: BatchSource, features: Mapping[str, np.ndarray]) -> None:
        self.base = base
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
        for batch in self.base.epoch(epoch, batch_size=batch_size, fields=[f for f in fields if f not in own], **kw):
            rows = np.fromiter((self.row[t] for t in batch["tile_id"]), np.int64, len(batch["tile_id"]))
            for f in own:
                batch[f] = torch.from_numpy(self.features[f][rows])
            yield batch


@dataclass
class FoldData:
    """The three partitions of one fold plus the fold's panel."""

    fit: BatchSource
    val: BatchSource
    test: BatchSource
    core_genes: list[str]
    addon_genes: list[str]
    #: encoder -> sample_id -> features zarr path (results/{cohort}/features/{encoder}/{sample}.zarr)
    feature_paths: dict[str, dict[str, str]] = field(default_factory=dict)


def fold_from_stores(cohort_dir: str | Path, fold: int, *, feature_paths: Mapping[str, Mapping[str, str]] | None = None,
                     buffer_chunks: int = 8) -> FoldData:
    """``FoldData`` over ``results/{cohort}``: splits/fold{k}.parquet, panels/fold{k}.json, samples/*/ stores."""
    from morphomol import store

    panel = store.load_panel(cohort_dir, fold)
    parts = {p: StoreSplit(cohort_dir, fold, p, panel, buffer_chunks=buffer_chunks) for p in ("fit", "val", "test")}
    for p, ds in parts.items():
        if len(ds) == 0:
            raise InputError(f"fold {fold} has no '{p}' tiles", file=Path(cohort_dir) / "splits" / f"fold{fold}.parquet",
                             field="partition", expected="fit, val and test tiles in every fold")
    return FoldData(parts["fit"], parts["val"], parts["test"], list(panel["core"]), list(panel["addon"]),
                    {k: dict(v) for k, v in (feature_paths or {}).items()})


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    nb = device.type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if torch.is_tensor(v) else v) for k, v in batch.items()}


def synthetic_tiles(n: int, n_core: int = 8, n_targets: int = 3, *, seed: int = 0, img_size: int = 224,
                    sample: str = "synth") -> tuple[InMemoryTiles, list[str], list[str]]:
    """A small cohort with known structure (tests, ``benchmarks/bench_train.py --synthetic``).

    Per tile a morphology latent ``b`` (image brightness) and a molecular latent ``u`` (rate of
    core gene 0 on every token). Targets (log1p space): ``t0 = b + u`` (jointly determined),
    ``t1 = b`` (morphology only), ``t2 = u`` (expression only), further targets copy
    ``log1p`` of a core gene's tile count.
    """
    rng = np.random.default_rng(seed)
    b = rng.uniform(0, 1, n).astype(np.float32)
    u = rng.uniform(0, 1, n).astype(np.float32)
    noise = rng.integers(0, 40, size=(n, img_size, img_size, 3), dtype=np.int16)
    image = np.clip(40 + 150 * b[:, None, None, None] + noise, 0, 255).astype(np.uint8)
    rates = np.full((n, N_TOKENS, n_core), 0.3, dtype=np.float32)
    rates[:, :, 0] = 2.0 * u[:, None]
    tokens = rng.poisson(rates).astype(np.float32)
    tile = tokens.sum(axis=1)
    cols = [b + u, b, u] + [np.log1p(tile[:, j % n_core]) for j in range(max(0, n_targets - 3))]
    target = np.stack(cols[:n_targets], axis=1).astype(np.float32)
    ids = [f"{sample}__{i:06d}" for i in range(n)]
    ds = InMemoryTiles(ids, image=image, tokens=tokens, tile=tile, target=target)
    return ds, [f"CORE{j}" for j in range(n_core)], [f"ADD{j}" for j in range(n_targets)]


# ---- cached frozen features


def read_feature_cache(paths: Mapping[str, str | Path], tile_ids: Sequence[str]) -> np.ndarray:
    """Rows of ``features/{encoder}/{sample}.zarr`` (array ``features`` (N, D)) for the given tile ids."""
    import zarr

    by_sample: dict[str, list[tuple[int, int]]] = {}
    for row, tid in enumerate(tile_ids):
        sample, _, index = str(tid).rpartition("__")
        by_sample.setdefault(sample, []).append((row, int(index)))
    out: np.ndarray | None = None
    for sample, pairs in by_sample.items():
        if sample not in paths:
            raise InputError(f"no cached features for sample '{sample}'", field="features",
                             expected="a features zarr per sample of the cohort")
        path = Path(paths[sample])
        try:
            arr = zarr.open_group(str(path), mode="r")["features"]
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"cannot read array 'features' ({exc})", file=path, field="features") from None
        feats = np.asarray(arr[:], dtype=np.float32)
        rows = np.array([r for r, _ in pairs])
        idx = np.array([i for _, i in pairs])
        if idx.max() >= len(feats):
            raise InputError(f"tile index {idx.max()} out of range ({len(feats)} rows)", file=path, field="features",
                             expected="one feature row per tile of tiles.parquet")
        if out is None:
            out = np.empty((len(tile_ids), feats.shape[1]), dtype=np.float32)
        out[rows] = feats[idx]
    if out is None:
        raise InputError("no tiles to read features for")
    return out


@torch.no_grad()
def frozen_vit_features(vit: ViTEncoder, ds: BatchSource, batch_size: int, device: torch.device) -> np.ndarray:
    """CLS embeddings of a frozen ViT, computed once per tile, rows in ``ds.tile_ids`` order
    (used when no features cache is given)."""
    vit = vit.to(device).eval()
    out, ids = [], []
    for batch in ds.epoch(0, batch_size=batch_size, fields=["image"], shuffle=False):
        ids += list(batch["tile_id"])
        batch = to_device(batch, device)
        with _autocast(device):
            out.append(vit(batch["image"]).float().cpu())
    feats = torch.cat(out).numpy()
    pos = {t: i for i, t in enumerate(ids)}
    return feats[np.array([pos[t] for t in ds.tile_ids], dtype=np.int64)]


# =========================================================================== 3. schedule


def learning_rate(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` then cosine from ``base_lr`` to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# =========================================================================== 4. preemption


class Preempted(SystemExit):
    """Raised after ``resume.pt`` was written because SIGTERM arrived; exits with code 143."""

    def __init__(self, resume_path: Path) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.resume_path = resume_path


class StopFlag:
    """Context manager: SIGTERM (and SIGUSR1, SLURM's ``--signal``) set ``requested`` instead of killing."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: Any) -> None:
        self.requested, self.signum = True, signum

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


# =========================================================================== 5. the loop


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: torch.nn.Module, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
               loss_fn: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor], trainable: Sequence[torch.Tensor],
               grad_clip: float, device: torch.device) -> torch.Tensor:
    """One optimisation step on a batch already on ``device``; returns the (detached) loss."""
    with _autocast(device):
        loss = loss_fn(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip and grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    optimizer.step()
    return loss.detach()


def regression_loss(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """MSE over add-on genes and tiles, on log1p targets."""
    return F.mse_loss(model(batch).float(), batch["target"].float())


@dataclass
class FitResult:
    best_epoch: int
    best_val: float
    epochs_run: int
    history: list[dict[str, Any]]
    train_seconds: float
    tiles_per_second: float
    resumed: bool


def fit(
    model: torch.nn.Module,
    fit_ds: BatchSource,
    batch_fields: Sequence[str],
    cfg: TrainConfig,
    work_dir: str | Path,
    *,
    loss_fn: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor],
    validate: Callable[[torch.nn.Module], tuple[float, dict[str, float]]],
    fingerprint: str,
    batch_size: int | None = None,
    drop_last: bool = False,
    val_name: str = "val_mse",
    on_step: Callable[[int], None] | None = None,
) -> FitResult:
    """Train ``model`` in place; on return it holds the best (lowest validation score) weights.

    ``validate(model) -> (score, extras)``: lower score is better (validation MSE / InfoNCE).
    ``work_dir/resume.pt`` is written at every epoch end and on SIGTERM, and read on start
    when its fingerprint matches.
    """
    device = cfg.resolved_device()
    bs = batch_size or cfg.batch_size
    work_dir = Path(work_dir)
    resume_path = work_dir / RESUME_NAME
    n_fit = len(fit_ds)
    if n_fit == 0:
        raise InputError("no tiles in the fit partition", field="partition", expected="at least one 'fit' tile")

    # ---- optimizer: two lr groups, AdamW, manual warm-up + cosine schedule
    raw = model
    groups = raw.param_groups(cfg.lr_head, cfg.lr_backbone)  # type: ignore[operator]
    for g in groups:
        g["base_lr"] = g["lr"]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr_head, weight_decay=cfg.weight_decay)
    trainable = [p for g in groups for p in g["params"]]
    steps_per_epoch = fit_ds.n_batches(bs, drop_last)
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    step_model = torch.compile(raw) if cfg.compile else raw

    # ---- state: fresh, or restored from resume.pt
    st: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "best_val": math.inf, "best_epoch": -1,
                          "bad_epochs": 0, "history": [], "train_seconds": 0.0, "tiles": 0,
                          "epoch_loss_sum": 0.0, "epoch_tiles": 0, "epoch_seconds": 0.0}
    best_state: dict[str, torch.Tensor] | None = None
    resumed = False
    if resume_path.exists():
        ckpt = torch.load(resume_path, map_location="cpu", weights_only=True)
        if ckpt.get("fingerprint") != fingerprint:
            log.warning("%s belongs to a different run configuration; starting from scratch", resume_path)
        else:
            raw.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            st.update(ckpt["state"])
            best_state = ckpt.get("best_model")
            _set_rng_state(ckpt["rng"])
            resumed = True
            log.info("resumed from %s at epoch %d, batch %d (step %d)", resume_path, st["epoch"], st["batch"], st["step"])

    def save_resume() -> None:
        payload = {"fingerprint": fingerprint, "model": _cpu_state(raw), "optimizer": optimizer.state_dict(),
                   "schedule": {"step": st["step"], "warmup_steps": warmup_steps, "total_steps": total_steps},
                   "state": dict(st), "best_model": best_state, "rng": _rng_state()}
        with atomic_path(resume_path) as tmp:
            torch.save(payload, tmp)

    # ---- the epochs
    with StopFlag() as stop:
        epoch = st["epoch"]
        while epoch < cfg.epochs and not (st["best_epoch"] >= 0 and st["bad_epochs"] >= cfg.patience):
            raw.train()
            t0 = time.perf_counter()
            loss_acc = torch.zeros((), device=device)  # summed on device: no host sync per step
            stream = fit_ds.epoch(epoch, batch_size=bs, fields=batch_fields, seed=cfg.seed, shuffle=True,
                                  drop_last=drop_last, skip=st["batch"], num_workers=cfg.num_workers,
                                  pin_memory=device.type == "cuda")
            for batch in stream:
                for g in optimizer.param_groups:
                    g["lr"] = learning_rate(st["step"], g["base_lr"], cfg.min_lr, warmup_steps, total_steps)
                batch = to_device(batch, device)
                loss = train_step(step_model, batch, optimizer, loss_fn, trainable, cfg.grad_clip, device)
                n = len(batch["tile_id"])
                st["step"] += 1
                st["batch"] += 1
                loss_acc += loss.detach().float() * n
                st["epoch_tiles"] += n
                if on_step is not None:
                    on_step(st["step"])
                if stop.requested:
                    st["epoch_loss_sum"] += float(loss_acc)
                    st["epoch_seconds"] += time.perf_counter() - t0
                    st["train_seconds"] += time.perf_counter() - t0
                    save_resume()
                    log.warning("signal %s: saved %s at epoch %d batch %d; exiting for a later resume",
                                stop.signum, resume_path, epoch, st["batch"])
                    raise Preempted(resume_path)
            st["epoch_loss_sum"] += float(loss_acc)  # also synchronises the device
            seconds = time.perf_counter() - t0
            st["epoch_seconds"] += seconds
            st["train_seconds"] += seconds
            st["tiles"] += st["epoch_tiles"]

            # ---- validation, model selection, early stopping
            raw.eval()
            val, extras = validate(raw)
            improved = math.isfinite(val) and val < st["best_val"]
            if improved:
                st["best_val"], st["best_epoch"], st["bad_epochs"] = val, epoch, 0
                best_state = _cpu_state(raw)
            else:
                st["bad_epochs"] += 1
            rec = {"epoch": epoch, "loss": st["epoch_loss_sum"] / max(1, st["epoch_tiles"]), val_name: val, **extras,
                   "tiles_per_second": st["epoch_tiles"] / max(st["epoch_seconds"], 1e-9),
                   "lr_head": optimizer.param_groups[0]["lr"]}
            st["history"].append(rec)
            extra_txt = " ".join(f"{k} {v:.4f}" for k, v in extras.items())
            log.info("epoch %d/%d loss %.4f %s %.4f %s | %.1f tiles/s | lr %s%s", epoch + 1, cfg.epochs, rec["loss"],
                     val_name, val, extra_txt, rec["tiles_per_second"],
                     "/".join(f"{g['lr']:.2e}" for g in optimizer.param_groups), " *" if improved else "")
            epoch += 1
            st.update(epoch=epoch, batch=0, epoch_loss_sum=0.0, epoch_tiles=0, epoch_seconds=0.0)
            save_resume()
            if stop.requested:
                log.warning("signal %s: saved %s after epoch %d; exiting for a later resume", stop.signum,
                            resume_path, epoch)
                raise Preempted(resume_path)
        if st["best_epoch"] >= 0 and st["bad_epochs"] >= cfg.patience and epoch < cfg.epochs:
            log.info("early stopping after epoch %d (no improvement for %d epochs)", epoch, st["bad_epochs"])

    if best_state is not None:
        raw.load_state_dict(best_state)
    return FitResult(best_epoch=st["best_epoch"], best_val=st["best_val"], epochs_run=len(st["history"]),
                     history=st["history"], train_seconds=st["train_seconds"],
                     tiles_per_second=st["tiles"] / max(st["train_seconds"], 1e-9), resumed=resumed)


def _fingerprint(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _ids_digest(ids: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in ids:
        h.update(str(t).encode() + b"\0")
    return h.hexdigest()[:16]


def _set_deterministic(mode: bool) -> None:
    """``torch.use_deterministic_algorithms`` without importing torch._inductor (~3 s per training
    job) when nothing in this process has loaded it: inductor's flag only matters to torch.compile."""
    if "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(mode)
    else:
        torch._C._set_deterministic_algorithms(mode)


@contextlib.contextmanager
def _run_context(cfg: TrainConfig) -> Iterator[torch.device]:
    """Threads, seeds and deterministic algorithms (CPU) for the duration of one run."""
    device = cfg.resolved_device()
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    if device.type == "cpu":
        _set_deterministic(True)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        yield device
    finally:
        torch.set_num_threads(old_threads)
        _set_deterministic(old_det)


@torch.no_grad()
def predict(model: torch.nn.Module, ds: BatchSource, fields: Sequence[str], batch_size: int,
            device: torch.device, num_workers: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(tile_ids, y, y_hat) over a whole split in the loader's unshuffled order."""
    model.eval()
    ids: list[str] = []
    ys, yh = [], []
    for batch in ds.epoch(0, batch_size=batch_size, fields=fields, shuffle=False, num_workers=num_workers,
                          pin_memory=device.type == "cuda"):
        batch = to_device(batch, device)
        with _autocast(device):
            out = model(batch)
        ids += list(batch["tile_id"])
        ys.append(batch["target"].float().cpu())
        yh.append(out.float().cpu())
    return ids, torch.cat(ys).numpy(), torch.cat(yh).numpy()


def _save_checkpoint(model: torch.nn.Module, path: str | Path, meta_path: str | Path, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state = _cpu_state(model)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"setting": str(meta.get("setting", "")), "format": "morphomol"})
    evaluation.write_json(meta_path, meta)


@dataclass
class RunOutputs:
    """Where one run writes (defaults: ``out_dir/<name>``; Snakemake passes explicit paths)."""

    metrics: Path
    predictions: Path | None = None
    checkpoint: Path | None = None
    checkpoint_meta: Path | None = None

    @classmethod
    def in_dir(cls, out_dir: str | Path) -> RunOutputs:
        d = Path(out_dir)
        return cls(d / "metrics.json", d / "predictions.parquet", d / "checkpoint.safetensors", d / "checkpoint.json")

    @property
    def work_dir(self) -> Path:
        return self.metrics.parent


def _outputs(out: str | Path | RunOutputs) -> RunOutputs:
    return out if isinstance(out, RunOutputs) else RunOutputs.in_dir(out)


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# =========================================================================== 6. a Table A.1 run


def _attach_features(setting: ModelSetting, data: FoldData, cfg: TrainConfig, model_cfg: Mapping[str, Any],
                     vit_weights: str | None, device: torch.device) -> tuple[dict[str, BatchSource], int | None, int | None, dict[str, Any]]:
    """Wrap the splits with cached frozen features when the setting uses them."""
    splits: dict[str, BatchSource] = {"fit": data.fit, "val": data.val, "test": data.test}
    feats: dict[str, dict[str, np.ndarray]] = {k: {} for k in splits}
    info: dict[str, Any] = {}
    morph_dim = expr_dim = None
    for key, enc in (("morph_feat", setting.morph_cache), ("expr_feat", setting.expr_cache)):
        if enc is None:
            continue
        if enc in data.feature_paths:
            for k, ds in splits.items():
                feats[k][key] = read_feature_cache(data.feature_paths[enc], ds.tile_ids)
            info[enc] = "cache"
        elif enc == "vit_s":
            torch.manual_seed(cfg.seed)
            vit = ViTEncoder(model_cfg.get("vit"), vit_weights)
            for k, ds in splits.items():
                feats[k][key] = frozen_vit_features(vit, ds, cfg.batch_size, device)
            info[enc] = "computed"
            log.info("computed frozen vit_s features once per tile (%d tiles)", sum(len(s) for s in splits.values()))
        else:
            raise InputError(f"setting '{setting.name}' needs cached '{enc}' features",
                             field=f"features/{enc}", expected="results/{cohort}/features/" + enc + "/{sample}.zarr")
        dim = feats["fit"][key].shape[1]
        morph_dim, expr_dim = (dim, expr_dim) if key == "morph_feat" else (morph_dim, dim)
    if any(feats[k] for k in feats):
        splits = {k: WithFeatures(ds, feats[k]) for k, ds in splits.items()}
    return splits, morph_dim, expr_dim, info


def train_setting(
    setting: ModelSetting | dict[str, Any],
    data: FoldData,
    out: str | Path | RunOutputs,
    *,
    fold: int = 0,
    train_cfg: TrainConfig | None = None,
    model_cfg: Mapping[str, Any] | None = None,
    encoders_cfg: Mapping[str, Any] | None = None,
    setting_name: str | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train + evaluate one regression setting on one fold; returns the metrics dict (also written)."""
    s = as_setting(setting, setting_name)
    if s.kind == "min_mae":
        return run_min_mae(data, out, fold=fold, setting_name=s.name)
    if s.kind == "clip":
        return train_clip(s, data, out, fold=fold, train_cfg=train_cfg, model_cfg=model_cfg, encoders_cfg=encoders_cfg,
                          on_step=on_step)
    cfg = train_cfg or TrainConfig()
    mcfg = dict(model_cfg or {})
    outs = _outputs(out)
    missing = missing_weights(s, dict(encoders_cfg or {}))
    if missing:
        raise InputError(f"setting '{s.name}' needs weights for {missing}", field=f"encoders.{missing[0]}.weights",
                         expected="a local weights file")
    vit_weights = encoder_weights(dict(encoders_cfg or {}), "vit_s") if s.morph_encoder == "vit_s" else None
    if vit_weights and not Path(vit_weights).exists():
        raise InputError("weights file not found", file=vit_weights, field="encoders.vit_s.weights")

    with _run_context(cfg) as device:
        splits, morph_dim, expr_dim, feat_info = _attach_features(s, data, cfg, mcfg, vit_weights, device)
        fields = list(s.batch_fields)
        fields += [k for k, enc in (("morph_feat", s.morph_cache), ("expr_feat", s.expr_cache)) if enc is not None]
        torch.manual_seed(cfg.seed)
        model = build_model(s, len(data.core_genes), len(data.addon_genes), mcfg, vit_weights=vit_weights,
                            morph_dim=morph_dim, expr_dim=expr_dim).to(device)
        # start the head at the fit-set target mean (log1p space) instead of 0: the first epochs
        # then learn structure rather than the offset (matters for short runs; deterministic)
        target_mean = _gather(splits["fit"], ["target"])["target"].mean(axis=0)
        with torch.no_grad():
            model.head.bias.copy_(torch.from_numpy(target_mean))
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        counts = model.param_counts()
        log.info("setting %s fold %d on %s: fit %d / val %d / test %d tiles; params %s; fields %s", s.name, fold,
                 device, len(splits["fit"]), len(splits["val"]), len(splits["test"]), counts, fields)

        def validate(m: torch.nn.Module) -> tuple[float, dict[str, float]]:
            _, y, y_hat = predict(m, splits["val"], fields, cfg.batch_size, device, cfg.num_workers)
            pg = evaluation.per_gene_metrics(y, y_hat, data.addon_genes)
            mse = float(((y_hat - y) ** 2).mean())
            return mse, {"val_pearson": evaluation.summarize(pg)["pearson"]}

        fp = _fingerprint(setting=s.to_dict(), cfg={k: v for k, v in asdict(cfg).items()
                                                    if k not in ("threads", "num_workers", "device")},
                          model=mcfg, fit=_ids_digest(splits["fit"].tile_ids), val=_ids_digest(splits["val"].tile_ids),
                          core=data.core_genes, addon=data.addon_genes, vit_weights=vit_weights, fold=fold)
        res = fit(model, splits["fit"], fields, cfg, outs.work_dir, loss_fn=regression_loss, validate=validate,
                  fingerprint=fp, on_step=on_step)

        ids, y, y_hat = predict(model, splits["test"], fields, cfg.batch_size, device, cfg.num_workers)

    report = evaluation.regression_report(y, y_hat, data.addon_genes)
    metrics = {
        "setting": s.name, "fold": int(fold), "kind": "regression", "status": "ok",
        "n_fit": len(splits["fit"]), "n_val": len(splits["val"]), "n_test": len(splits["test"]),
        **report,
        "best_epoch": res.best_epoch, "epochs_run": res.epochs_run, "val_mse": res.best_val,
        "train_seconds": res.train_seconds, "tiles_per_second": res.tiles_per_second,
        "pretrained": bool(vit_weights) if s.morph_encoder == "vit_s" else s.morph_encoder is not None,
        "paper_row": s.paper_row, "params": counts, "features": feat_info, "device": str(device),
        "resumed": res.resumed, "seed": cfg.seed,
    }
    meta = {"setting": s.name, "setting_fields": s.to_dict(), "fold": int(fold), "n_core": len(data.core_genes),
            "n_targets": len(data.addon_genes), "core_genes": data.core_genes, "addon_genes": data.addon_genes,
            "model": mcfg, "morph_dim": morph_dim, "expr_dim": expr_dim, "vit_weights": vit_weights,
            "vit_weights_sha256": _sha256(vit_weights) if vit_weights else None, "features": feat_info,
            "best_epoch": res.best_epoch, "val_mse": res.best_val, "history": res.history,
            "training": asdict(cfg), "torch": torch.__version__}
    if outs.checkpoint is not None:
        _save_checkpoint(model, outs.checkpoint, outs.checkpoint_meta or outs.checkpoint.with_suffix(".json"), meta)
    if outs.predictions is not None:
        evaluation.write_predictions(outs.predictions, ids, data.addon_genes, y, y_hat)
    evaluation.write_json(outs.metrics, metrics)
    (outs.work_dir / RESUME_NAME).unlink(missing_ok=True)
    log.info("%s fold %d: test pearson %.4f spearman %.4f mse %.4f (best epoch %d of %d)", s.name, fold,
             metrics["mean"]["pearson"], metrics["mean"]["spearman"], metrics["mean"]["mse"], res.best_epoch + 1,
             res.epochs_run)
    return metrics


# =========================================================================== 7. Min-MAE


def _gather(ds: BatchSource, fields: Sequence[str], batch_size: int = 4096) -> dict[str, Any]:
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


def min_mae_select(x: np.ndarray, y: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """For each target column of ``y`` the column of ``x`` with the lowest MAE (ties: lowest index).

    Both in log1p space, (N, G) and (N, T). Returns ``(best (T,), mae (T, G))``.
    """
    x_t = torch.from_numpy(np.asarray(x, dtype=np.float64))
    y_t = torch.from_numpy(np.asarray(y, dtype=np.float64))
    total = torch.zeros(y_t.shape[1], x_t.shape[1], dtype=torch.float64)
    for i in range(0, x_t.shape[0], chunk):
        total += torch.cdist(y_t[i:i + chunk].T.contiguous(), x_t[i:i + chunk].T.contiguous(), p=1)
    mae = (total / max(1, x_t.shape[0])).numpy()
    return mae.argmin(axis=1), mae


def run_min_mae(data: FoldData, out: str | Path | RunOutputs, *, fold: int = 0, setting_name: str = "min_mae") -> dict[str, Any]:
    """Min-MAE baseline: copy, per target gene, the fit-set MAE-optimal core gene (log1p tile counts)."""
    outs = _outputs(out)
    t0 = time.perf_counter()
    fit_arr = _gather(data.fit, ["tile", "target"])
    best, mae = min_mae_select(np.log1p(fit_arr["tile"]), fit_arr["target"])
    test_arr = _gather(data.test, ["tile", "target"])
    y_hat = np.log1p(test_arr["tile"])[:, best]
    y = test_arr["target"]
    seconds = time.perf_counter() - t0
    mapping = {t: data.core_genes[j] for t, j in zip(data.addon_genes, best)}
    report = evaluation.regression_report(y, y_hat, data.addon_genes)
    metrics = {"setting": setting_name, "fold": int(fold), "kind": "regression", "status": "ok",
               "n_fit": len(data.fit), "n_val": len(data.val), "n_test": len(data.test), **report,
               "best_epoch": None, "epochs_run": 0, "train_seconds": seconds,
               "tiles_per_second": (len(data.fit) + len(data.test)) / max(seconds, 1e-9),
               "pretrained": False, "paper_row": "min-mae", "source_gene": mapping,
               "fit_mae": {t: float(mae[i, j]) for i, (t, j) in enumerate(zip(data.addon_genes, best))}}
    if outs.predictions is not None:
        evaluation.write_predictions(outs.predictions, test_arr["tile_id"], data.addon_genes, y, y_hat)
    if outs.checkpoint_meta is not None:
        evaluation.write_json(outs.checkpoint_meta, {"setting": setting_name, "fold": int(fold), "kind": "min_mae",
                                                     "source_gene": mapping, "core_genes": data.core_genes,
                                                     "addon_genes": data.addon_genes})
    evaluation.write_json(outs.metrics, metrics)
    log.info("min_mae fold %d: test pearson %.4f mse %.4f", fold, metrics["mean"]["pearson"], metrics["mean"]["mse"])
    return metrics


# =========================================================================== 8. CLIP


@torch.no_grad()
def clip_embeddings(model: ClipModel, ds: BatchSource, fields: Sequence[str], batch_size: int,
                    device: torch.device, num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised (image, transcript) embeddings of a split, in the loader's unshuffled order."""
    model.eval()
    imgs, txts = [], []
    for batch in ds.epoch(0, batch_size=batch_size, fields=fields, shuffle=False, num_workers=num_workers,
                          pin_memory=device.type == "cuda"):
        batch = to_device(batch, device)
        with _autocast(device):
            i, t = model(batch)
        imgs.append(i.float().cpu())
        txts.append(t.float().cpu())
    return torch.cat(imgs).numpy(), torch.cat(txts).numpy()


def train_clip(
    setting: ModelSetting | dict[str, Any],
    data: FoldData,
    out: str | Path | RunOutputs,
    *,
    fold: int = 0,
    train_cfg: TrainConfig | None = None,
    model_cfg: Mapping[str, Any] | None = None,
    encoders_cfg: Mapping[str, Any] | None = None,
    setting_name: str | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """CLIP pretraining (ViT vs core-transcript MLP) with batches of ``clip_batch_size``; recall@k on test."""
    s = as_setting(setting, setting_name)
    cfg = train_cfg or TrainConfig()
    mcfg = dict(model_cfg or {})
    outs = _outputs(out)
    vit_weights = encoder_weights(dict(encoders_cfg or {}), "vit_s")
    fields = list(s.batch_fields)
    bs = cfg.clip_batch_size
    with _run_context(cfg) as device:
        torch.manual_seed(cfg.seed)
        model = build_clip_model(s, len(data.core_genes), mcfg, vit_weights=vit_weights).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        log.info("CLIP %s fold %d on %s: fit %d / val %d / test %d tiles, batch %d", s.name, fold, device,
                 len(data.fit), len(data.val), len(data.test), bs)
        if len(data.fit) < bs:
            log.warning("fit partition (%d tiles) is smaller than training.clip_batch_size (%d): one smaller "
                        "contrastive batch per epoch", len(data.fit), bs)

        def loss_fn(m: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
            img, txt = m(batch)
            return clip_loss(img, txt, model.scale())

        def validate(m: torch.nn.Module) -> tuple[float, dict[str, float]]:
            img, txt = clip_embeddings(model, data.val, fields, bs, device, cfg.num_workers)
            scale = model.scale().detach().float().cpu()
            losses = [float(clip_loss(torch.from_numpy(img[i:i + bs]), torch.from_numpy(txt[i:i + bs]), scale))
                      for i in range(0, len(img), bs) if len(img[i:i + bs]) > 1]
            rec = evaluation.recall_at_k(img, txt, ks=(1,), chunk_size=bs, seed=cfg.seed) if len(img) > 1 else {}
            return (float(np.mean(losses)) if losses else math.nan), {"val_recall@1": rec.get("recall@1", math.nan)}

        fp = _fingerprint(setting=s.to_dict(), cfg={k: v for k, v in asdict(cfg).items()
                                                    if k not in ("threads", "num_workers", "device")},
                          model=mcfg, fit=_ids_digest(data.fit.tile_ids), core=data.core_genes,
                          vit_weights=vit_weights, fold=fold)
        res = fit(model, data.fit, fields, cfg, outs.work_dir, loss_fn=loss_fn, validate=validate, fingerprint=fp,
                  batch_size=bs, drop_last=True, val_name="val_infonce", on_step=on_step)
        img, txt = clip_embeddings(model, data.test, fields, bs, device, cfg.num_workers)

    rec = evaluation.recall_at_k(img, txt, ks=(1, 5), chunk_size=bs, seed=cfg.seed)
    metrics = {"setting": s.name, "fold": int(fold), "kind": "clip", "status": "ok",
               "n_fit": len(data.fit), "n_val": len(data.val), "n_test": len(data.test),
               "recall@1": rec["recall@1"], "recall@5": rec["recall@5"],
               "random_recall@1": rec["random_recall@1"], "random_recall@5": rec["random_recall@5"],
               "retrieval": {"direction": "image->transcript", "chunk_size": rec["chunk_size"],
                             "n_chunks": rec["n_chunks"], "n_queries": rec["n_queries"]},
               "best_epoch": res.best_epoch, "epochs_run": res.epochs_run, "val_infonce": res.best_val,
               "train_seconds": res.train_seconds, "tiles_per_second": res.tiles_per_second,
               "pretrained": bool(vit_weights), "paper_row": s.paper_row, "device": str(device), "seed": cfg.seed,
               "logit_scale": float(model.logit_scale.detach().cpu()), "resumed": res.resumed}
    if outs.checkpoint is not None:
        meta = {"setting": s.name, "setting_fields": s.to_dict(), "fold": int(fold), "kind": "clip",
                "core_genes": data.core_genes, "model": mcfg, "vit_weights": vit_weights,
                "best_epoch": res.best_epoch, "history": res.history, "training": asdict(cfg),
                "torch": torch.__version__}
        _save_checkpoint(model, outs.checkpoint, outs.checkpoint_meta or outs.checkpoint.with_suffix(".json"), meta)
    evaluation.write_json(outs.metrics, metrics)
    (outs.work_dir / RESUME_NAME).unlink(missing_ok=True)
    log.info("CLIP %s fold %d: recall@1 %.4f recall@5 %.4f (random %.4f / %.4f)", s.name, fold, rec["recall@1"],
             rec["recall@5"], rec["random_recall@1"], rec["random_recall@5"])
    return metrics


# =========================================================================== 9. Snakemake entry


def run_from_stores(
    *,
    cohort_dir: str | Path,
    fold: int,
    setting: ModelSetting | dict[str, Any],
    setting_name: str | None,
    outputs: RunOutputs,
    training: Mapping[str, Any] | None = None,
    model: Mapping[str, Any] | None = None,
    encoders: Mapping[str, Any] | None = None,
    seed: int = 0,
    threads: int | None = None,
    num_workers: int | None = None,
    feature_paths: Mapping[str, Mapping[str, str]] | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """One run (any kind) over ``results/{cohort}`` stores; what the train/min_mae/clip rules call."""
    s = as_setting(setting, setting_name)
    cfg = TrainConfig.from_config(training, seed, threads=threads, num_workers=num_workers, device=device)
    buffer_chunks = int((training or {}).get("buffer_chunks", 8))
    data = fold_from_stores(cohort_dir, fold, feature_paths=feature_paths, buffer_chunks=buffer_chunks)
    return train_setting(s, data, outputs, fold=fold, train_cfg=cfg, model_cfg=model, encoders_cfg=encoders)


def run_rule(smk: Any) -> dict[str, Any]:
    """Adapter body for scripts/train.py, scripts/minmae.py and scripts/clip.py."""
    out = smk.output
    outputs = RunOutputs(
        metrics=Path(out.metrics),
        predictions=Path(out.predictions) if "predictions" in out.keys() else None,
        checkpoint=Path(out.checkpoint) if "checkpoint" in out.keys() else None,
        checkpoint_meta=Path(out.checkpoint_meta) if "checkpoint_meta" in out.keys() else None,
    )
    p = smk.params
    return run_from_stores(
        cohort_dir=Path(smk.input.split).parent.parent, fold=int(smk.wildcards.fold), setting=dict(p.setting),
        setting_name=smk.wildcards.setting, outputs=outputs, training=p.training, model=p.model,
        encoders=p.encoders, seed=int(p.seed), threads=int(smk.threads), num_workers=p.num_workers,
        feature_paths=p.feature_paths)
