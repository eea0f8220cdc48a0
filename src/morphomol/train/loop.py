"""The training loop, read top to bottom.

1. ``learning_rate``  linear warm-up then cosine to ``min_lr``, per optimizer step.
2. ``train_step``     forward under autocast, backward, grad-norm clip, AdamW step.
3. ``FitState``       the loop's typed state (what ``resume.pt`` stores besides weights and RNG).
4. ``fit``            AdamW with two lr groups (head / backbone), validation per epoch, early stopping
                      on the validation score, best weights kept; SIGTERM -> ``resume.pt`` + exit 143.
5. ``predict``        a whole source in its unshuffled order.

Determinism: the order of the fit batches in epoch ``e`` depends only on ``(seed, e)``; a resumed
run restores model, optimizer, schedule position, RNG states, best state and early-stopping
counters and skips the batches of the interrupted epoch that were already consumed, so on CPU
(deterministic algorithms) it ends with bit-identical weights and metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from morphomol.config.sections import TrainingConfig
from morphomol.errors import InputError
from morphomol.train.checkpoint import cpu_state
from morphomol.train.resume import (
    RESUME_NAME,
    Preempted,
    StopFlag,
    load_resume,
    rng_state,
    save_resume,
    set_rng_state,
)
from morphomol.train.runtime import Runtime, autocast, to_device
from morphomol.train.sources import BatchSource
from morphomol.util.logs import get_logger

log = get_logger("train")

LossFn = Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor]


# =========================================================================== 1. schedule
def learning_rate(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` then cosine from ``base_lr`` to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# =========================================================================== 2. one step
def train_step(model: torch.nn.Module, batch: dict[str, Any], optimizer: torch.optim.Optimizer, loss_fn: LossFn,
               trainable: Sequence[torch.Tensor], grad_clip: float, device: torch.device) -> torch.Tensor:
    """One optimisation step on a batch already on ``device``; returns the (detached) loss."""
    with autocast(device):
        loss = loss_fn(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip and grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    optimizer.step()
    return loss.detach()


# =========================================================================== 3. state
@dataclass
class FitState:
    """Position and bookkeeping of a fit; saved in ``resume.pt`` (plain types only)."""

    epoch: int = 0                 # next epoch to run
    batch: int = 0                 # batches of ``epoch`` already consumed
    step: int = 0                  # optimizer steps so far (schedule position)
    best_val: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0            # epochs without improvement (early stopping)
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    tiles: int = 0                 # units trained on in finished epochs
    epoch_loss_sum: float = 0.0    # of the current epoch (loss x units), across an interruption
    epoch_tiles: int = 0
    epoch_seconds: float = 0.0

    def stopped_early(self, patience: int) -> bool:
        return self.best_epoch >= 0 and self.bad_epochs >= patience


@dataclass
class FitResult:
    best_epoch: int
    best_val: float
    epochs_run: int
    history: list[dict[str, Any]]
    train_seconds: float
    tiles_per_second: float
    resumed: bool


# =========================================================================== 4. the loop
def fit(
    model: torch.nn.Module,
    fit_ds: BatchSource,
    batch_fields: Sequence[str],
    training: TrainingConfig,
    runtime: Runtime,
    work_dir: str | Path,
    *,
    loss_fn: LossFn,
    validate: Callable[[torch.nn.Module], tuple[float, dict[str, float]]],
    fingerprint: dict[str, str],
    batch_size: int | None = None,
    drop_last: bool = False,
    val_name: str = "val_mse",
    on_step: Callable[[int], None] | None = None,
) -> FitResult:
    """Train ``model`` in place; on return it holds the best (lowest validation score) weights.

    ``model`` provides ``param_groups(lr_head, lr_backbone)``. ``validate(model) -> (score, extras)``:
    lower score is better (validation MSE / InfoNCE). ``work_dir/resume.pt`` is written at every
    epoch end and on SIGTERM, and read on start when its fingerprint matches (see :mod:`.resume`).
    """
    device = runtime.resolved_device()
    bs = batch_size or training.batch_size
    num_workers = runtime.workers(training.num_workers)
    resume_path = Path(work_dir) / RESUME_NAME
    if len(fit_ds) == 0:
        raise InputError("no tiles in the fit partition", field="partition", expected="at least one 'fit' tile")

    # ---- optimizer: two lr groups, AdamW, manual warm-up + cosine schedule
    raw = model
    groups = raw.param_groups(training.lr_head, training.lr_backbone)  # type: ignore[operator]
    for g in groups:
        g["base_lr"] = g["lr"]
    optimizer = torch.optim.AdamW(groups, lr=training.lr_head, weight_decay=training.weight_decay)
    trainable = [p for g in groups for p in g["params"]]
    steps_per_epoch = fit_ds.n_batches(bs, drop_last)
    warmup_steps = training.warmup_epochs * steps_per_epoch
    total_steps = training.epochs * steps_per_epoch
    step_model = torch.compile(raw) if training.compile else raw

    # ---- state: fresh, or restored from resume.pt
    st = FitState()
    best_state: dict[str, torch.Tensor] | None = None
    ckpt = load_resume(resume_path, fingerprint)
    resumed = ckpt is not None
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        st = FitState(**ckpt["state"])
        best_state = ckpt.get("best_model")
        set_rng_state(ckpt["rng"])
        log.info("resumed from %s at epoch %d, batch %d (step %d)", resume_path, st.epoch, st.batch, st.step)

    def save() -> None:
        save_resume(resume_path, {
            "fingerprint": dict(fingerprint), "model": cpu_state(raw), "optimizer": optimizer.state_dict(),
            "schedule": {"step": st.step, "warmup_steps": warmup_steps, "total_steps": total_steps},
            "state": asdict(st), "best_model": best_state, "rng": rng_state()})

    # ---- the epochs
    with StopFlag() as stop:
        while st.epoch < training.epochs and not st.stopped_early(training.patience):
            raw.train()
            t0 = time.perf_counter()
            loss_acc = torch.zeros((), device=device)  # summed on device: no host sync per step
            stream = fit_ds.epoch(st.epoch, batch_size=bs, fields=batch_fields, seed=runtime.seed, shuffle=True,
                                  drop_last=drop_last, skip=st.batch, num_workers=num_workers,
                                  pin_memory=device.type == "cuda")
            for batch in stream:
                for g in optimizer.param_groups:
                    g["lr"] = learning_rate(st.step, g["base_lr"], training.min_lr, warmup_steps, total_steps)
                batch = to_device(batch, device)
                loss = train_step(step_model, batch, optimizer, loss_fn, trainable, training.grad_clip, device)
                n = len(batch["tile_id"])
                st.step += 1
                st.batch += 1
                loss_acc += loss.detach().float() * n
                st.epoch_tiles += n
                if on_step is not None:
                    on_step(st.step)
                if stop.requested:
                    st.epoch_loss_sum += float(loss_acc)
                    st.epoch_seconds += time.perf_counter() - t0
                    st.train_seconds += time.perf_counter() - t0
                    save()
                    log.warning("signal %s: saved %s at epoch %d batch %d; exiting for a later resume",
                                stop.signum, resume_path, st.epoch, st.batch)
                    raise Preempted(resume_path)
            st.epoch_loss_sum += float(loss_acc)  # also synchronises the device
            seconds = time.perf_counter() - t0
            st.epoch_seconds += seconds
            st.train_seconds += seconds
            st.tiles += st.epoch_tiles

            # ---- validation, model selection, early stopping
            raw.eval()
            val, extras = validate(raw)
            improved = math.isfinite(val) and val < st.best_val
            if improved:
                st.best_val, st.best_epoch, st.bad_epochs = val, st.epoch, 0
                best_state = cpu_state(raw)
            else:
                st.bad_epochs += 1
            rec = {"epoch": st.epoch, "loss": st.epoch_loss_sum / max(1, st.epoch_tiles), val_name: val, **extras,
                   "tiles_per_second": st.epoch_tiles / max(st.epoch_seconds, 1e-9),
                   "lr_head": optimizer.param_groups[0]["lr"]}
            st.history.append(rec)
            extra_txt = " ".join(f"{k} {v:.4f}" for k, v in extras.items())
            log.info("epoch %d/%d loss %.4f %s %.4f %s | %.1f tiles/s | lr %s%s", st.epoch + 1, training.epochs,
                     rec["loss"], val_name, val, extra_txt, rec["tiles_per_second"],
                     "/".join(f"{g['lr']:.2e}" for g in optimizer.param_groups), " *" if improved else "")
            st.epoch += 1
            st.batch, st.epoch_loss_sum, st.epoch_tiles, st.epoch_seconds = 0, 0.0, 0, 0.0
            save()
            if stop.requested:
                log.warning("signal %s: saved %s after epoch %d; exiting for a later resume", stop.signum,
                            resume_path, st.epoch)
                raise Preempted(resume_path)
        if st.stopped_early(training.patience) and st.epoch < training.epochs:
            log.info("early stopping after epoch %d (no improvement for %d epochs)", st.epoch, st.bad_epochs)

    if best_state is not None:
        raw.load_state_dict(best_state)
    return FitResult(best_epoch=st.best_epoch, best_val=st.best_val, epochs_run=len(st.history),
                     history=st.history, train_seconds=st.train_seconds,
                     tiles_per_second=st.tiles / max(st.train_seconds, 1e-9), resumed=resumed)


def finish(work_dir: str | Path) -> None:
    """A run wrote its outputs: its resume state is no longer needed."""
    (Path(work_dir) / RESUME_NAME).unlink(missing_ok=True)


# =========================================================================== 5. prediction
@torch.no_grad()
def predict(model: torch.nn.Module, ds: BatchSource, fields: Sequence[str], batch_size: int,
            device: torch.device, num_workers: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(unit ids, y, y_hat) over a whole source in its unshuffled order."""
    model.eval()
    ids: list[str] = []
    ys, yh = [], []
    for batch in ds.epoch(0, batch_size=batch_size, fields=fields, shuffle=False, num_workers=num_workers,
                          pin_memory=device.type == "cuda"):
        batch = to_device(batch, device)
        with autocast(device):
            out = model(batch)
        ids += list(batch["tile_id"])
        ys.append(batch["target"].float().cpu())
        yh.append(out.float().cpu())
    return ids, torch.cat(ys).numpy(), torch.cat(yh).numpy()
