"""Training the alignment module with the shared loop (:func:`morphomol.train.loop.fit`).

Slides are the units of a batch (``tile_id`` = slide ids). The fit partition is shuffled per epoch
(seeded), the validation partition scores every epoch with the symmetric InfoNCE over all its
pairs at once (lower is better): early stopping on it, best weights kept. ``resume.pt`` (shared
preemption handling) lives in the given work directory and is removed when the fit ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from morphomol.config.sections import TrainingConfig
from morphomol.studies.slides.models import AlignModel
from morphomol.train.loop import FitResult, finish, fit
from morphomol.train.runtime import Runtime, run_context
from morphomol.train.sources import InMemoryTiles


@dataclass
class AlignData:
    """Rows = slides: their ids and aligned arrays (``slide`` or ``bag`` + ``mask``; ``rna``)."""

    ids: list[str]
    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, idx: np.ndarray) -> AlignData:
        idx = np.asarray(idx, np.int64)
        return AlignData([self.ids[i] for i in idx], {k: v[idx] for k, v in self.arrays.items()})

    def with_rna(self, rna: np.ndarray) -> AlignData:
        return AlignData(list(self.ids), {**self.arrays, "rna": np.asarray(rna, np.float32)})

    @property
    def fields(self) -> list[str]:
        return [k for k in ("bag", "mask", "slide", "rna") if k in self.arrays]


def input_stats(data: AlignData, bag: bool) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(slide mean/sd, RNA mean/sd) of the training rows: tile-level over real (unpadded) tiles for bags."""
    if bag:
        x = data.arrays["bag"][data.arrays["mask"]]
    else:
        x = data.arrays["slide"]
    r = data.arrays["rna"]
    return (x.mean(axis=0), x.std(axis=0) + 1e-6), (r.mean(axis=0), r.std(axis=0) + 1e-6)


def build_model(train: AlignData, cfg: Any, *, bag: bool, seed: int) -> AlignModel:
    """A fresh model (seeded init) standardised with ``train``'s statistics. ``cfg``: AlignConfig."""
    slide_stats, rna_stats = input_stats(train, bag)
    d = train.arrays["bag"].shape[-1] if bag else train.arrays["slide"].shape[1]
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
def val_loss(model: AlignModel, data: AlignData) -> float:
    model.eval()
    batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in data.arrays.items()}
    return float(model.loss(batch))


def train_align(model: AlignModel, fit_data: AlignData, val_data: AlignData, cfg: Any, *, work_dir: str | Path,
                seed: int, fingerprint: dict[str, str], epochs: int | None = None, lr: float | None = None,
                threads: int | None = None) -> FitResult:
    """Train ``model`` in place (best validation weights kept); returns the shared loop's FitResult."""
    training = training_config(cfg, epochs=epochs, lr=lr)
    runtime = Runtime(seed=int(seed), threads=threads, device="cpu", num_workers=0)
    src = InMemoryTiles(fit_data.ids, **fit_data.arrays)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    bs = int(min(cfg.batch_size, max(2, len(fit_data))))
    with run_context(runtime):
        res = fit(model, src, fit_data.fields, training, runtime, work,
                  loss_fn=lambda m, b: m.loss(b),  # type: ignore[attr-defined]
                  validate=lambda m: (val_loss(m, val_data), {}),  # type: ignore[arg-type]
                  fingerprint=fingerprint, batch_size=bs, drop_last=False, val_name="val_infonce")
    finish(work)
    try:
        work.rmdir()
    except OSError:
        pass
    model.eval()
    return res
