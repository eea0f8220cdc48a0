"""Training the alignment module with the shared loop (:func:`morphomol.train.loop.fit`).

Slides are the units of a batch (``tile_id`` = slide ids). The fit partition is shuffled per epoch
(seeded), the validation partition scores every epoch with the symmetric InfoNCE over all its
pairs at once (lower is better): early stopping on it, best weights kept. ``resume.pt`` (shared
preemption handling) lives in the given work directory and is removed when the fit ends.

Bags (ABMIL settings) come from the per-slide embeddings (:class:`~morphomol.studies.slides.bank.BagSet`)
and are read per batch — for training, validation and evaluation — so that a job holds one batch of bags,
never the cohort's; their standardisation statistics are streamed (float64 sums over the real tiles).
Vector settings keep their (N, D) vectors in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from morphomol.config.sections import TrainingConfig
from morphomol.studies.slides.models import AlignModel
from morphomol.train.loop import FitResult, finish, fit
from morphomol.train.runtime import Runtime, run_context
from morphomol.train.sources import InMemoryTiles, epoch_batches

#: slides per evaluation batch of slide vectors (bags: ``align.batch_size``, as in training)
EVAL_BATCH = 256


@dataclass
class AlignData:
    """Rows = slides: their ids, aligned in-memory arrays (``slide`` or ``bag`` + ``mask``; ``rna``) and,
    for bags read from the slide embeddings, ``bags`` (a BagSet, same rows)."""

    ids: list[str]
    arrays: dict[str, np.ndarray]
    bags: Any = None

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, idx: np.ndarray) -> AlignData:
        idx = np.asarray(idx, np.int64)
        return AlignData([self.ids[i] for i in idx], {k: v[idx] for k, v in self.arrays.items()},
                         None if self.bags is None else self.bags.subset(idx))

    def with_rna(self, rna: np.ndarray) -> AlignData:
        return AlignData(list(self.ids), {**self.arrays, "rna": np.asarray(rna, np.float32)}, self.bags)

    @property
    def is_bag(self) -> bool:
        return self.bags is not None or "bag" in self.arrays

    @property
    def fields(self) -> list[str]:
        have = set(self.arrays) | ({"bag", "mask"} if self.bags is not None else set())
        return [k for k in ("bag", "mask", "slide", "rna") if k in have]

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Numpy arrays of rows ``idx`` (bags read from the embeddings when they are not in memory)."""
        idx = np.asarray(idx, np.int64)
        out = {k: np.ascontiguousarray(v[idx]) for k, v in self.arrays.items()}
        if self.bags is not None:
            out["bag"], out["mask"] = self.bags.read(idx)
        return out

    def eval_batch_size(self, bag_batch: int | None = None) -> int:
        """Rows per evaluation batch: EVAL_BATCH, or ``bag_batch`` (the training batch) for bags read per batch."""
        return int(bag_batch) if self.bags is not None and bag_batch else EVAL_BATCH

    def batches(self, batch_size: int) -> Iterable[dict[str, np.ndarray]]:
        for a in range(0, len(self), batch_size):
            yield self.batch(np.arange(a, min(a + batch_size, len(self))))


class BagSlides:
    """The shared loop's batch contract over :class:`AlignData` with bags read per batch (same batch order as
    :class:`~morphomol.train.sources.InMemoryTiles`)."""

    epoch_options = frozenset()

    def __init__(self, data: AlignData) -> None:
        self.data = data
        self.tile_ids = list(data.ids)

    def __len__(self) -> int:
        return len(self.data)

    def n_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return len(epoch_batches(self, batch_size, 0, 0, shuffle=False, drop_last=drop_last))

    def epoch(self, epoch: int, *, batch_size: int, fields: Sequence[str], seed: int = 0, shuffle: bool = True,
              drop_last: bool = False, skip: int = 0, num_workers: int = 0,
              pin_memory: bool = False) -> Iterable[dict[str, Any]]:
        for b in epoch_batches(self, batch_size, seed, epoch, shuffle=shuffle, drop_last=drop_last)[skip:]:
            arrays = self.data.batch(b)
            out: dict[str, Any] = {"tile_id": [self.tile_ids[i] for i in b]}
            for f in fields:
                out[f] = torch.from_numpy(arrays[f])
            yield out


def input_stats(data: AlignData, bag: bool) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(slide mean/sd, RNA mean/sd) of the training rows: tile-level over real (unpadded) tiles for bags
    (streamed for bags read from the embeddings)."""
    if bag and data.bags is not None:
        from morphomol.studies.slides.bank import tile_moments

        m, sd, _ = tile_moments(data.bags)
        slide_stats = (m.astype(np.float32), (sd + 1e-6).astype(np.float32))
    else:
        x = data.arrays["bag"][data.arrays["mask"]] if bag else data.arrays["slide"]
        slide_stats = (x.mean(axis=0), x.std(axis=0) + 1e-6)
    r = data.arrays["rna"]
    return slide_stats, (r.mean(axis=0), r.std(axis=0) + 1e-6)


def build_model(train: AlignData, cfg: Any, *, bag: bool, seed: int) -> AlignModel:
    """A fresh model (seeded init) standardised with ``train``'s statistics. ``cfg``: AlignConfig."""
    slide_stats, rna_stats = input_stats(train, bag)
    if bag:
        d = train.bags.dim if train.bags is not None else train.arrays["bag"].shape[-1]
    else:
        d = train.arrays["slide"].shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return AlignModel(int(d), int(train.arrays["rna"].shape[1]), proj_dim=cfg.proj_dim, hidden=cfg.hidden,
                          dropout=cfg.dropout, temperature=cfg.temperature, bag=bag, slide_stats=slide_stats,
                          rna_stats=rna_stats)


def training_config(cfg: Any, *, epochs: int | None = None, lr: float | None = None) -> TrainingConfig:
    """The shared loop's TrainingConfig from ``slides.align`` (one lr group; no loader workers)."""
    n_epochs = int(epochs or cfg.epochs)
    return TrainingConfig(epochs=n_epochs, warmup_epochs=min(cfg.warmup_epochs, max(0, n_epochs - 1)),
                          batch_size=cfg.batch_size, lr_head=float(lr or cfg.lr), lr_backbone=float(lr or cfg.lr),
                          min_lr=cfg.min_lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                          patience=cfg.patience, num_workers=0, clip_batch_size=None, buffer_chunks=1, compile=False)


@torch.no_grad()
def val_loss(model: AlignModel, data: AlignData, bag_batch: int | None = None) -> float:
    """Symmetric InfoNCE over all validation pairs at once (slide embeddings computed per batch for bags
    read from the embeddings: eval mode, so the same loss)."""
    from morphomol.models.contrastive import clip_loss

    model.eval()
    if data.bags is None:
        batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in data.arrays.items()}
        return float(model.loss(batch))
    zs = torch.cat([model.embed_slide({k: torch.from_numpy(v) for k, v in b.items()})
                    for b in data.batches(data.eval_batch_size(bag_batch))])
    return float(clip_loss(zs, model.embed_rna(torch.from_numpy(np.ascontiguousarray(data.arrays["rna"]))),
                           model.scale))


@torch.no_grad()
def embed_data(model: AlignModel, data: AlignData, bag_batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(slide embeddings, RNA embeddings) of every row (eval mode, float32); bags read ``bag_batch`` slides at a
    time."""
    from morphomol.studies.slides.models import embed_all

    if data.bags is None:
        return embed_all(model, data.arrays, batch_size=EVAL_BATCH)
    model.eval()
    zs, zr = [], []
    for b in data.batches(data.eval_batch_size(bag_batch)):
        t = {k: torch.from_numpy(v) for k, v in b.items()}
        zs.append(model.embed_slide(t).cpu().numpy())
        zr.append(model.embed_rna(t["rna"]).cpu().numpy())
    return np.concatenate(zs).astype(np.float32), np.concatenate(zr).astype(np.float32)


def train_align(model: AlignModel, fit_data: AlignData, val_data: AlignData, cfg: Any, *, work_dir: str | Path,
                seed: int, fingerprint: dict[str, str], epochs: int | None = None, lr: float | None = None,
                threads: int | None = None) -> FitResult:
    """Train ``model`` in place (best validation weights kept); returns the shared loop's FitResult."""
    training = training_config(cfg, epochs=epochs, lr=lr)
    runtime = Runtime(seed=int(seed), threads=threads, device="cpu", num_workers=0)
    src = BagSlides(fit_data) if fit_data.bags is not None else InMemoryTiles(fit_data.ids, **fit_data.arrays)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    bs = int(min(cfg.batch_size, max(2, len(fit_data))))
    with run_context(runtime):
        res = fit(model, src, fit_data.fields, training, runtime, work,
                  loss_fn=lambda m, b: m.loss(b),  # type: ignore[attr-defined]
                  # no validation slides (splits.validation none): fixed epochs, last weights
                  validate=(lambda m: (val_loss(m, val_data, cfg.batch_size), {}))  # type: ignore[arg-type]
                  if len(val_data) else None,
                  fingerprint=fingerprint, batch_size=bs, drop_last=False, val_name="val_infonce")
    finish(work)
    try:
        work.rmdir()
    except OSError:
        pass
    model.eval()
    return res
