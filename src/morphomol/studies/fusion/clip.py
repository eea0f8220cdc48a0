"""Table A.2: CLIP pretraining of the ViT-S against the core-transcript MLP, recall@k on test tiles."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from morphomol.config.sections import ModelConfig, TrainingConfig
from morphomol.data.runs import write_metrics
from morphomol.eval.metrics import recall_at_k
from morphomol.studies.fusion.data import FoldData, FoldInputs
from morphomol.studies.fusion.models import ClipModel, build_clip_model, clip_loss
from morphomol.studies.fusion.regression import run_training, vit_weights_for
from morphomol.studies.fusion.settings import ModelSetting
from morphomol.train import ddp
from morphomol.train.checkpoint import RunOutputs, as_outputs, save_checkpoint
from morphomol.train.loop import epoch_kwargs, finish, fit, is_compiled, pad_batch
from morphomol.train.resume import fingerprint
from morphomol.train.runtime import Runtime, autocast, loader_threads, run_context, to_device
from morphomol.train.sources import BatchSource
from morphomol.util.hashing import ids_digest
from morphomol.util.logs import get_logger

log = get_logger("fusion.clip")


@torch.no_grad()
def clip_embeddings(model: ClipModel | torch.nn.Module, ds: BatchSource, fields: Sequence[str], batch_size: int,
                    device: torch.device, num_workers: int = 0,
                    threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised (image, transcript) embeddings of a split, in the loader's unshuffled order
    (kept on the device until the end; a compiled model gets a padded last batch; in a
    data-parallel run each rank embeds its part of every batch and all ranks return the whole)."""
    model.eval()
    dist = ddp.current()
    pad = is_compiled(model)
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    for batch in ds.epoch(0, batch_size=batch_size, fields=fields, shuffle=False, num_workers=num_workers,
                          pin_memory=device.type == "cuda",
                          **epoch_kwargs(ds, device=device, threads=threads, dist=dist)):
        n = len(batch["tile_id"])
        if n == 0:
            parts.append((torch.zeros(0), torch.zeros(0)))
            continue
        batch = to_device(batch, device)
        if pad and n < batch_size:
            batch = pad_batch(batch, batch_size)
        with autocast(device):
            i, t = model(batch)
        parts.append((i[:n].float(), t[:n].float()))
    if dist.active:
        local = [(i.cpu().numpy(), t.cpu().numpy()) for i, t in parts]
        got = [p for per_rank in ddp.gather_parts(local) for p in per_rank if len(p[0])]
        return np.concatenate([p[0] for p in got]), np.concatenate([p[1] for p in got])
    kept = [p for p in parts if len(p[0])]
    return torch.cat([p[0] for p in kept]).cpu().numpy(), torch.cat([p[1] for p in kept]).cpu().numpy()


def train_clip(
    setting: ModelSetting,
    data: FoldData,
    out: str | Path | RunOutputs,
    *,
    training: TrainingConfig,
    model: ModelConfig,
    runtime: Runtime = Runtime(),
    weights: Mapping[str, str | None] | None = None,
    fold: int = 0,
    inputs: FoldInputs | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """CLIP pretraining (ViT vs core-transcript MLP) with batches of ``clip_batch_size``; recall@k on test."""
    s = setting
    mcfg = model
    outs = as_outputs(out)
    vit_weights = vit_weights_for(s, dict(weights or {}))
    fields = list(s.batch_fields)
    bs = training.clip_batch_size
    num_workers = runtime.workers(training.num_workers)
    dist = ddp.current()
    with run_context(runtime) as device:
        threads = loader_threads(training, runtime, device)
        torch.manual_seed(runtime.seed)
        model = build_clip_model(s, len(data.core_genes), mcfg, vit_weights=vit_weights).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        log.info("CLIP %s fold %d on %s: fit %d / val %d / test %d tiles, batch %d", s.name, fold, device,
                 len(data.fit), len(data.val), len(data.test), bs)
        if len(data.fit) < bs:
            log.warning("fit partition (%d tiles) is smaller than training.clip_batch_size (%d): one smaller "
                        "contrastive batch per epoch", len(data.fit), bs)

        n_global = min(bs, len(data.fit))  # fit batches: drop_last

        def loss_fn(m: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
            img, txt = m(batch)
            if dist.active:  # InfoNCE over the whole batch: every rank's embeddings, gradients to their own
                img, txt = ddp.gather_with_grad(img, n_global), ddp.gather_with_grad(txt, n_global)
            return clip_loss(img, txt, model.scale())

        def validate(m: torch.nn.Module) -> tuple[float, dict[str, float]]:
            img, txt = clip_embeddings(m, data.val, fields, bs, device, num_workers, threads)
            scale = model.scale().detach().float().cpu()
            losses = [float(clip_loss(torch.from_numpy(img[i:i + bs]), torch.from_numpy(txt[i:i + bs]), scale))
                      for i in range(0, len(img), bs) if len(img[i:i + bs]) > 1]
            rec = recall_at_k(img, txt, ks=(1,), chunk_size=bs, seed=runtime.seed) if len(img) > 1 else {}
            return (float(np.mean(losses)) if losses else math.nan), {"val_recall@1": rec.get("recall@1", math.nan)}

        fp = fingerprint(
            setting=s.to_dict(), training=run_training(training),
            seed=runtime.seed, model=mcfg, fit=ids_digest(data.fit.tile_ids), core=data.core_genes,
            vit_weights=vit_weights, fold=fold, inputs=inputs.artifacts() if inputs is not None else None)
        has_val = len(data.val) > 0  # none: the fold's splits.validation policy is none (fixed epochs)
        res = fit(model, data.fit, fields, training, runtime, outs.work_dir, loss_fn=loss_fn,
                  validate=validate if has_val else None,
                  fingerprint=fp, batch_size=bs, drop_last=True, val_name="val_infonce", on_step=on_step,
                  loss_reduction="global" if dist.active else "mean")
        img, txt = clip_embeddings(model, data.test, fields, bs, device, num_workers, threads)

    rec = recall_at_k(img, txt, ks=(1, 5), chunk_size=bs, seed=runtime.seed)
    metrics = {"setting": s.name, "fold": int(fold), "kind": "clip", "status": "ok",
               "n_fit": len(data.fit), "n_val": len(data.val), "n_test": len(data.test),
               "recall@1": rec["recall@1"], "recall@5": rec["recall@5"],
               "random_recall@1": rec["random_recall@1"], "random_recall@5": rec["random_recall@5"],
               "retrieval": {"direction": "image->transcript", "chunk_size": rec["chunk_size"],
                             "n_chunks": rec["n_chunks"], "n_queries": rec["n_queries"]},
               "best_epoch": res.best_epoch, "epochs_run": res.epochs_run, "val_infonce": res.best_val,
               "validation": "val partition" if has_val else "none", "selection": res.selection,
               "train_seconds": res.train_seconds, "tiles_per_second": res.tiles_per_second,
               "pretrained": bool(vit_weights), "paper_row": s.paper_row, "device": str(device), "seed": runtime.seed,
               "logit_scale": float(model.logit_scale.detach().cpu()), "resumed": res.resumed,
               "compile_seconds": res.compile_seconds, "processes": dist.world}
    if not dist.is_main:
        return metrics
    if outs.checkpoint is not None:
        meta = {"setting": s.name, "setting_fields": s.to_dict(), "fold": int(fold), "kind": "clip",
                "core_genes": data.core_genes, "model": mcfg, "vit_weights": vit_weights,
                "best_epoch": res.best_epoch, "history": res.history, "training": training,
                "seed": runtime.seed, "torch": torch.__version__}
        save_checkpoint(model, outs.checkpoint, outs.checkpoint_meta or outs.checkpoint.with_suffix(".json"), meta)
    write_metrics(outs.metrics, metrics)
    finish(outs.work_dir)
    log.info("CLIP %s fold %d: recall@1 %.4f recall@5 %.4f (random %.4f / %.4f)", s.name, fold, rec["recall@1"],
             rec["recall@5"], rec["random_recall@1"], rec["random_recall@5"])
    return metrics
