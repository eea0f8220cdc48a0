"""The training loop, read top to bottom.

1. ``learning_rate``  linear warm-up then cosine to ``min_lr``, per optimizer step.
2. ``train_step``     forward under autocast, backward, grad-norm clip, AdamW step.
3. ``FitState``       the loop's typed state (what ``resume.pt`` stores besides weights and RNG).
4. ``fit``            AdamW with two lr groups (head / backbone; fused on CUDA), validation every
                      ``validate_every`` epochs, early stopping on the validation score, best weights
                      kept; without a validation partition (``validate=None``: a fold whose
                      ``splits.validation`` policy is ``none``) ``training.epochs`` fixed epochs, no early
                      stopping, the last weights kept (``FitResult.selection``); ``resume.pt`` every
                      ``checkpoint_every`` epochs (written in the background) and on SIGTERM (-> exit 143).
5. ``predict``        a whole source in its unshuffled order (results gathered on the device).

Progress and history: the batches of an epoch go through :class:`morphomol.util.progress.TrainProgress` (a
bar per epoch in a terminal, by default; rate-limited log lines with the time left in the epoch and in the
whole run under SLURM / in rule logs; each epoch's log line ends with the run's time left); after every
epoch ``work_dir/history.csv`` (one row per epoch: loss, validation score and extras, tiles/s, lr) is
rewritten, and when the fit ends (or is preempted) ``work_dir/learning_curve.png`` is drawn from it, titled
with the run (cohort · study · setting · fold; rank 0 only; neither changes a number).

Input pipeline: the loop passes a source the optional ``epoch`` keywords it lists in
``epoch_options`` (:mod:`.sources`): ``device`` (batches arrive on the device), ``threads`` (the
store feed, :func:`.runtime.loader_threads`), ``shard`` (data-parallel runs, :mod:`.ddp`).
``training.compile``: the step (and evaluation) run through ``torch.compile``; the last short fit
batch is dropped and the last evaluation batch padded, so nothing recompiles; the first compiled
step's time is reported apart (``compile_seconds``), not in tiles/s.

Determinism: the order of the fit batches in epoch ``e`` depends only on ``(seed, e)``; a resumed
run restores model, optimizer, schedule position, RNG states, best state and early-stopping
counters and skips the batches of the interrupted epoch that were already consumed (in the plan:
they are not read again), so on CPU (deterministic algorithms) it ends with bit-identical weights
and metrics.
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
from morphomol.train import ddp
from morphomol.train.resume import (
    RESUME_NAME,
    Preempted,
    ResumeWriter,
    StopFlag,
    detached,
    load_resume,
    rng_state,
    set_rng_state,
)
from morphomol.train.runtime import Runtime, autocast, loader_threads, to_device
from morphomol.train.sources import BatchSource, epoch_options
from morphomol.util.logs import get_logger
from morphomol.train.history import write_history
from morphomol.util.progress import TrainProgress

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
               trainable: Sequence[torch.Tensor], grad_clip: float, device: torch.device, *,
               scale: float = 1.0) -> torch.Tensor:
    """One optimisation step on a batch already on ``device``; returns the (detached) loss.
    ``scale`` multiplies the loss before ``backward`` (a data-parallel rank's share of the batch)."""
    with autocast(device):
        loss = loss_fn(model, batch)
    optimizer.zero_grad(set_to_none=True)
    (loss * scale if scale != 1.0 else loss).backward()
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
    compile_seconds: float = 0.0   # first compiled steps (not in the tiles/s figures)
    epoch_untimed_tiles: int = 0   # tiles of this epoch's compiling step
    last_val_epoch: int = -1       # epochs since the last validation count towards patience

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
    compile_seconds: float = 0.0
    #: how the returned weights were chosen: ``best_val`` (lowest validation score, early stopping) or
    #: ``last_epoch`` (no validation partition: fixed ``training.epochs``, no early stopping)
    selection: str = "best_val"


def global_batch_sizes(n: int, batch_size: int, drop_last: bool) -> list[int]:
    """Tiles of each batch of an epoch over ``n`` tiles (every source cuts full batches + a remainder)."""
    if drop_last and n >= batch_size:
        return [batch_size] * (n // batch_size)
    return [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])


def epoch_kwargs(ds: Any, *, device: torch.device, threads: int | None, dist: ddp.Dist) -> dict[str, Any]:
    """The optional ``epoch`` keywords ``ds`` supports (device, threads, shard)."""
    opts = epoch_options(ds)
    kw: dict[str, Any] = {}
    if "device" in opts:
        kw["device"] = device
        if threads is not None and "threads" in opts:
            kw["threads"] = threads
    if dist.active:
        if "shard" not in opts:
            raise InputError(f"{type(ds).__name__} cannot shard batches over {dist.world} processes",
                             field="resources.train_gpus", expected="1, or a source with 'shard' in epoch_options")
        kw["shard"] = (dist.rank, dist.world)
    return kw

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
    validate: Callable[[torch.nn.Module], tuple[float, dict[str, float]]] | None,
    fingerprint: dict[str, str],
    batch_size: int | None = None,
    drop_last: bool = False,
    val_name: str = "val_mse",
    on_step: Callable[[int], None] | None = None,
    loss_reduction: str = "mean",
) -> FitResult:
    """Train ``model`` in place; on return it holds the best (lowest validation score) weights.

    ``model`` provides ``param_groups(lr_head, lr_backbone)``. ``validate(model) -> (score, extras)``:
    lower score is better (validation MSE / InfoNCE). ``validate=None`` (no validation partition): every one
    of ``training.epochs`` epochs runs, no early stopping, the last weights are kept (``best_epoch`` = the last
    epoch, ``best_val`` NaN, ``selection`` ``last_epoch``). ``work_dir/resume.pt`` is written every
    ``training.checkpoint_every`` epochs and on SIGTERM, and read on start when its fingerprint
    matches (see :mod:`.resume`). ``loss_reduction`` (data-parallel runs): ``mean`` — ``loss_fn``
    averages over its rows, each rank's loss is weighted by its share of the batch; ``global`` —
    ``loss_fn`` already computes the whole batch's loss (e.g. through :func:`.ddp.gather_with_grad`).
    """
    device = runtime.resolved_device()
    dist = ddp.current()
    bs = batch_size or training.batch_size
    threads = loader_threads(training, runtime, device)
    resume_path = Path(work_dir) / RESUME_NAME
    if len(fit_ds) == 0:
        raise InputError("no tiles in the fit partition", field="partition", expected="at least one 'fit' tile")
    if loss_reduction not in ("mean", "global"):
        raise ValueError("loss_reduction must be 'mean' or 'global'")
    compiled = bool(training.compile)
    if compiled and len(fit_ds) >= bs:
        drop_last = True  # a short last batch would recompile the step
    if dist.active and 0 < len(fit_ds) % bs < dist.world and len(fit_ds) >= bs:
        drop_last = True  # a remainder smaller than the process count would leave a rank without tiles
    kw = epoch_kwargs(fit_ds, device=device, threads=threads, dist=dist)

    # ---- optimizer: two lr groups, AdamW (fused on CUDA), manual warm-up + cosine schedule
    raw = model
    groups = raw.param_groups(training.lr_head, training.lr_backbone)  # type: ignore[operator]
    for g in groups:
        g["base_lr"] = g["lr"]
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(groups, lr=training.lr_head, weight_decay=training.weight_decay, **fused)
    trainable = [p for g in groups for p in g["params"]]
    steps_per_epoch = fit_ds.n_batches(bs, drop_last)
    sizes = global_batch_sizes(len(fit_ds), bs, drop_last)
    warmup_steps = training.warmup_epochs * steps_per_epoch
    total_steps = training.epochs * steps_per_epoch
    net = ddp.wrap(raw, device) if dist.active else raw
    step_model = torch.compile(net) if compiled else net
    eval_model = (step_model if not dist.active else torch.compile(raw)) if compiled else raw

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
    writer = ResumeWriter(resume_path)

    def payload() -> dict[str, Any]:
        # copies (model, optimizer state): safe to write in the background while training goes on
        return {"fingerprint": dict(fingerprint), "model": cpu_state(raw), "optimizer": detached(optimizer.state_dict()),
                "schedule": {"step": st.step, "warmup_steps": warmup_steps, "total_steps": total_steps},
                "state": asdict(st), "best_model": best_state, "rng": rng_state()}

    def stopping(requested: bool) -> bool:
        return ddp.any_flag(requested) if dist.active else requested

    patience = training.patience if validate is not None else training.epochs + 1  # never stops early
    if validate is None:
        log.info("no validation partition: %d fixed epochs (training.epochs), no early stopping, last weights kept",
                 training.epochs)
    first = True  # the first step of this process compiles (timed apart)
    prog = TrainProgress(epochs=training.epochs, steps_per_epoch=steps_per_epoch,
                         done=st.epoch * steps_per_epoch + st.batch, logger=log)
    # ---- the epochs
    try:
        with StopFlag() as stop:
            while st.epoch < training.epochs and not st.stopped_early(patience):
                raw.train()
                t0 = time.perf_counter()
                loss_acc = torch.zeros(2, device=device)  # (loss x tiles, tiles) summed on device: no sync per step
                stream = fit_ds.epoch(st.epoch, batch_size=bs, fields=batch_fields, seed=runtime.seed, shuffle=True,
                                      drop_last=drop_last, skip=st.batch, num_workers=runtime.workers(
                                          training.num_workers), pin_memory=device.type == "cuda", **kw)
                stream = prog.batches(stream, epoch=st.epoch, total=max(0, steps_per_epoch - st.batch),
                                      report=dist.is_main)
                for batch in stream:
                    for g in optimizer.param_groups:
                        g["lr"] = learning_rate(st.step, g["base_lr"], training.min_lr, warmup_steps, total_steps)
                    batch = to_device(batch, device)
                    n = len(batch["tile_id"])
                    n_global = sizes[min(st.batch, len(sizes) - 1)] if dist.active else n
                    scale = n * dist.world / n_global if dist.active and loss_reduction == "mean" else 1.0
                    ts = time.perf_counter()
                    loss = train_step(step_model, batch, optimizer, loss_fn, trainable, training.grad_clip, device,
                                      scale=scale)
                    if first and compiled:
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        st.compile_seconds += time.perf_counter() - ts
                        st.epoch_untimed_tiles += n_global
                        t0 += time.perf_counter() - ts
                    first = False
                    st.step += 1
                    st.batch += 1
                    loss_acc[0] += loss.detach().float() * n
                    loss_acc[1] += n
                    if on_step is not None:
                        on_step(st.step)
                    if stopping(stop.requested):
                        _add_sums(st, loss_acc, dist)
                        st.epoch_seconds += time.perf_counter() - t0
                        st.train_seconds += time.perf_counter() - t0
                        if dist.is_main:
                            writer.save_now(payload())
                            write_history(work_dir, st.history, curve=True)
                        if dist.active:
                            ddp.barrier()  # no rank exits (and gets its peers stopped) before the save
                        log.warning("signal %s: saved %s at epoch %d batch %d; exiting for a later resume",
                                    stop.signum, resume_path, st.epoch, st.batch)
                        raise Preempted(resume_path)
                _add_sums(st, loss_acc, dist)  # also synchronises the device
                seconds = time.perf_counter() - t0
                st.epoch_seconds += seconds
                st.train_seconds += seconds
                st.tiles += st.epoch_tiles - st.epoch_untimed_tiles

                # ---- validation (every k epochs and after the last), model selection, early stopping
                rec: dict[str, Any] = {"epoch": st.epoch, "loss": st.epoch_loss_sum / max(1, st.epoch_tiles),
                                       "tiles": st.epoch_tiles}
                last = st.epoch + 1 == training.epochs
                improved = False
                if validate is None:
                    rec[val_name] = None
                    val_txt = "(no validation)"
                    st.best_epoch, st.best_val = st.epoch, math.nan
                elif (st.epoch + 1) % max(1, training.validate_every) == 0 or last:
                    raw.eval()
                    val, extras = validate(eval_model)
                    improved = math.isfinite(val) and val < st.best_val
                    if improved:
                        st.best_val, st.best_epoch, st.bad_epochs = val, st.epoch, 0
                        best_state = cpu_state(raw)
                    else:
                        st.bad_epochs += st.epoch - st.last_val_epoch
                    st.last_val_epoch = st.epoch
                    rec.update({val_name: val, **extras})
                    extra_txt = " ".join(f"{k} {v:.4f}" for k, v in extras.items())
                    val_txt = f"{val_name} {val:.4f} {extra_txt}"
                else:
                    rec[val_name] = None
                    val_txt = "(not validated)"
                rec["tiles_per_second"] = (st.epoch_tiles - st.epoch_untimed_tiles) / max(st.epoch_seconds, 1e-9)
                rec["lr_head"] = optimizer.param_groups[0]["lr"]
                if st.compile_seconds and st.epoch_untimed_tiles:
                    rec["compile_seconds"] = st.compile_seconds
                st.history.append(rec)
                if dist.is_main:
                    write_history(work_dir, st.history)
                prog.done = (st.epoch + 1) * steps_per_epoch  # the plan's count after this epoch
                run_eta = prog.run_eta() if st.epoch + 1 < training.epochs else ""
                log.info("epoch %d/%d loss %.4f %s | %.1f tiles/s | lr %s%s%s", st.epoch + 1, training.epochs,
                         rec["loss"], val_txt, rec["tiles_per_second"],
                         "/".join(f"{g['lr']:.2e}" for g in optimizer.param_groups), " *" if improved else "",
                         f" | {run_eta}" if run_eta else "")
                st.epoch += 1
                st.batch, st.epoch_loss_sum, st.epoch_tiles, st.epoch_seconds = 0, 0.0, 0, 0.0
                st.epoch_untimed_tiles = 0
                stop_now = stopping(stop.requested)
                if dist.is_main and (stop_now or st.epoch % max(1, training.checkpoint_every) == 0
                                     or st.epoch >= training.epochs or st.stopped_early(patience)):
                    if stop_now:
                        writer.save_now(payload())
                    else:
                        writer.submit(payload())
                if stop_now:
                    if dist.is_main:
                        write_history(work_dir, st.history, curve=True)
                    if dist.active:
                        ddp.barrier()
                    log.warning("signal %s: saved %s after epoch %d; exiting for a later resume", stop.signum,
                                resume_path, st.epoch)
                    raise Preempted(resume_path)
            if st.stopped_early(patience) and st.epoch < training.epochs:
                log.info("early stopping after epoch %d (no improvement for %d epochs)", st.epoch, st.bad_epochs)
    finally:
        writer.close()

    if dist.is_main:
        write_history(work_dir, st.history, curve=True, best_epoch=st.best_epoch)
    if best_state is not None and validate is not None:
        raw.load_state_dict(best_state)
    if st.compile_seconds:
        log.info("compile: %.1f s (first step; excluded from tiles/s)", st.compile_seconds)
    return FitResult(best_epoch=st.best_epoch, best_val=st.best_val, epochs_run=len(st.history),
                     history=st.history, train_seconds=st.train_seconds,
                     tiles_per_second=st.tiles / max(st.train_seconds, 1e-9), resumed=resumed,
                     compile_seconds=st.compile_seconds, selection="best_val" if validate is not None else "last_epoch")


def _add_sums(st: FitState, acc: torch.Tensor, dist: ddp.Dist) -> None:
    """Add the (loss x tiles, tiles) sums of the steps since the last call (over ranks in a
    data-parallel run: every tile a rank trained on is counted) to ``st``; synchronises the device."""
    tot = (ddp.all_sum(acc.clone()) if dist.active else acc).tolist()
    st.epoch_loss_sum += float(tot[0])
    st.epoch_tiles += int(round(tot[1]))
    acc.zero_()


def finish(work_dir: str | Path) -> None:
    """A run wrote its outputs: its resume state is no longer needed."""
    (Path(work_dir) / RESUME_NAME).unlink(missing_ok=True)


# =========================================================================== 5. prediction
def pad_batch(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """Tensors of ``batch`` padded with zero rows to ``size`` (a compiled model keeps one shape)."""
    out = dict(batch)
    for k, v in batch.items():
        if torch.is_tensor(v) and v.ndim and v.shape[0] < size:
            out[k] = torch.cat([v, v.new_zeros((size - v.shape[0], *v.shape[1:]))])
    return out


def is_compiled(model: torch.nn.Module) -> bool:
    return type(model).__name__ == "OptimizedModule"


@torch.no_grad()
def predict(model: torch.nn.Module, ds: BatchSource, fields: Sequence[str], batch_size: int,
            device: torch.device, num_workers: int = 0, *, threads: int | None = None,
            pad_last: bool | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(unit ids, y, y_hat) over a whole source in its unshuffled order.

    Results stay on the device until the end (one copy back, no sync per batch). ``threads``: the
    store feed's decode threads (sources listing ``device``/``threads`` in ``epoch_options``).
    ``pad_last`` (default: when ``model`` is compiled) pads the last batch to ``batch_size``. In a
    data-parallel run every rank predicts its part of each batch and all ranks return the whole.
    """
    model.eval()
    dist = ddp.current()
    kw = epoch_kwargs(ds, device=device, threads=threads, dist=dist) if dist.active or epoch_options(ds) else {}
    if dist.active and "shard" not in epoch_options(ds):
        kw.pop("shard", None)  # pragma: no cover - _epoch_kwargs raised already
    leased = "device" in kw  # batches in reused buffers: copy what is kept
    pad = is_compiled(model) if pad_last is None else pad_last
    parts: list[tuple[list[str], torch.Tensor, torch.Tensor]] = []
    for batch in ds.epoch(0, batch_size=batch_size, fields=fields, shuffle=False, num_workers=num_workers,
                          pin_memory=device.type == "cuda", **kw):
        batch = to_device(batch, device)
        n = len(batch["tile_id"])
        if n == 0:
            parts.append(([], torch.zeros(0), torch.zeros(0)))
            continue
        with autocast(device):
            out = model(pad_batch(batch, batch_size) if pad and n < batch_size else batch)
        y = batch["target"].float()
        parts.append((list(batch["tile_id"]), y.clone() if leased else y, out[:n].float()))
    if dist.active:
        return _gathered(parts)
    ids = [t for p in parts for t in p[0]]
    ys = [p[1] for p in parts if len(p[0])]
    yh = [p[2] for p in parts if len(p[0])]
    return ids, torch.cat(ys).cpu().numpy(), torch.cat(yh).cpu().numpy()


def _gathered(parts: list[tuple[list[str], torch.Tensor, torch.Tensor]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Every rank's parts of every batch, in batch order then rank order (the unsharded order)."""
    local = [(p[0], p[1].cpu().numpy(), p[2].cpu().numpy()) for p in parts]
    ids: list[str] = []
    ys, yh = [], []
    for per_rank in ddp.gather_parts(local):
        for i, y, h in per_rank:
            if len(i):
                ids += i
                ys.append(y)
                yh.append(h)
    return ids, np.concatenate(ys), np.concatenate(yh)
