"""One Table A.1 run: train and evaluate one regression setting on one fold.

The head's bias starts at the fit-set target mean (log1p), the model is fitted by the shared loop
(:func:`morphomol.train.loop.fit`, MSE on log1p targets, early stopping on validation MSE), then the
best weights predict the test partition once. Writes metrics.json, predictions.parquet (one row group
per sample, column ``sample_id``) and the checkpoint (safetensors + JSON). Memory: the model, the loader's
chunk buffers and the test predictions of the fold; the fit-target mean is streamed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from morphomol.config.sections import ModelConfig, TrainingConfig
from morphomol.data.runs import sample_ids_of, write_metrics, write_predictions
from morphomol.errors import InputError
from morphomol.eval.metrics import per_gene_metrics, regression_report, summarize
from morphomol.models.vit import ViTEncoder
from morphomol.studies.fusion.data import FoldData, FoldInputs, attach_features, target_mean
from morphomol.studies.fusion.models import build_model
from morphomol.studies.fusion.settings import IN_MODEL_ENCODER, ModelSetting
from morphomol.train import ddp
from morphomol.train.checkpoint import RunOutputs, as_outputs, save_checkpoint
from morphomol.train.loop import finish, fit, predict
from morphomol.train.resume import fingerprint
from morphomol.train.runtime import Runtime, loader_threads, run_context
from morphomol.util.hashing import ids_digest, sha256_path
from morphomol.util.logs import get_logger

log = get_logger("fusion.regression")


def regression_loss(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """MSE over add-on genes and tiles, on log1p targets."""
    return F.mse_loss(model(batch).float(), batch["target"].float())


#: training options that never change a run's results (left out of its resume fingerprint)
EXECUTION_ONLY = ("num_workers", "loader_threads", "checkpoint_every")


def run_training(training: TrainingConfig) -> dict[str, Any]:
    """The training section as it enters a run's fingerprint (execution-only options left out)."""
    return {k: v for k, v in training.__dict__.items() if k not in EXECUTION_ONLY}


def vit_weights_for(setting: ModelSetting, weights: Mapping[str, str | None]) -> str | None:
    """The configured ViT-S weights when the setting's morph encoder is ViT-S (else None); checked to exist."""
    missing = setting.missing_weights(weights)
    if missing:
        raise InputError(f"setting '{setting.name}' needs weights for {missing}",
                         field=f"encoders.{missing[0]}.weights", expected="a local weights file")
    w = weights.get(IN_MODEL_ENCODER) if setting.morph_encoder == IN_MODEL_ENCODER else None
    if w and not Path(w).exists():
        raise InputError("weights file not found", file=w, field=f"encoders.{IN_MODEL_ENCODER}.weights")
    return str(w) if w else None


def train_setting(
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
    """Train + evaluate one regression setting on one fold; returns the metrics dict (also written).

    ``weights``: encoder -> configured local weights (None/absent: not configured). ``inputs``: the
    declared input artifacts, fingerprinted so that a resume only happens onto identical inputs.
    In a data-parallel run (:mod:`morphomol.train.ddp`) every rank trains; rank 0 writes.
    """
    s = setting
    weights = dict(weights or {})
    outs = as_outputs(out)
    vit_weights = vit_weights_for(s, weights)
    num_workers = runtime.workers(training.num_workers)

    with run_context(runtime) as device:
        splits, morph_dim, expr_dim, feat_info = attach_features(
            s, data, vit=lambda: ViTEncoder(model.vit, vit_weights), batch_size=training.batch_size,
            seed=runtime.seed, device=device)
        fields = list(s.batch_fields)
        fields += [k for k, enc in (("morph_feat", s.morph_cache), ("expr_feat", s.expr_cache)) if enc is not None]
        torch.manual_seed(runtime.seed)
        net = build_model(s, len(data.core_genes), len(data.addon_genes), model, vit_weights=vit_weights,
                          morph_dim=morph_dim, expr_dim=expr_dim).to(device)
        # start the head at the fit-set target mean (log1p space) instead of 0: the first epochs
        # then learn structure rather than the offset (matters for short runs; deterministic)
        # (streamed: one batch at a time, equal to the mean of the gathered fit targets)
        with torch.no_grad():
            net.head.bias.copy_(torch.from_numpy(target_mean(splits["fit"])))
        if device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        counts = net.param_counts()
        log.info("setting %s fold %d on %s: fit %d / val %d / test %d tiles; params %s; fields %s", s.name, fold,
                 device, len(splits["fit"]), len(splits["val"]), len(splits["test"]), counts, fields)

        threads = loader_threads(training, runtime, device)

        def validate(m: torch.nn.Module) -> tuple[float, dict[str, float]]:
            _, y, y_hat = predict(m, splits["val"], fields, training.batch_size, device, num_workers, threads=threads)
            pg = per_gene_metrics(y, y_hat, data.addon_genes)
            mse = float(((y_hat - y) ** 2).mean())
            return mse, {"val_pearson": summarize(pg)["pearson"]}

        fp = fingerprint(
            setting=s.to_dict(), training=run_training(training),
            seed=runtime.seed, model=model, fit=ids_digest(splits["fit"].tile_ids),
            val=ids_digest(splits["val"].tile_ids), core=data.core_genes, addon=data.addon_genes,
            vit_weights=vit_weights, fold=fold, inputs=inputs.artifacts() if inputs is not None else None)
        has_val = len(splits["val"]) > 0  # none: the fold's splits.validation policy is none (fixed epochs)
        res = fit(net, splits["fit"], fields, training, runtime, outs.work_dir, loss_fn=regression_loss,
                  validate=validate if has_val else None, fingerprint=fp, on_step=on_step)
        ids, y, y_hat = predict(net, splits["test"], fields, training.batch_size, device, num_workers, threads=threads)

    report = regression_report(y, y_hat, data.addon_genes)
    metrics = {
        "setting": s.name, "fold": int(fold), "kind": "regression", "status": "ok",
        "n_fit": len(splits["fit"]), "n_val": len(splits["val"]), "n_test": len(splits["test"]),
        **report,
        "best_epoch": res.best_epoch, "epochs_run": res.epochs_run, "val_mse": res.best_val,
        "validation": "val partition" if has_val else "none", "selection": res.selection,
        "train_seconds": res.train_seconds, "tiles_per_second": res.tiles_per_second,
        "pretrained": bool(vit_weights) if s.morph_encoder == IN_MODEL_ENCODER else s.morph_encoder is not None,
        "paper_row": s.paper_row, "params": counts, "features": feat_info, "device": str(device),
        "resumed": res.resumed, "seed": runtime.seed, "compile_seconds": res.compile_seconds,
        "processes": ddp.current().world,
    }
    meta = {"setting": s.name, "setting_fields": s.to_dict(), "fold": int(fold), "n_core": len(data.core_genes),
            "n_targets": len(data.addon_genes), "core_genes": data.core_genes, "addon_genes": data.addon_genes,
            "model": model, "morph_dim": morph_dim, "expr_dim": expr_dim, "vit_weights": vit_weights,
            "vit_weights_sha256": sha256_path(vit_weights) if vit_weights else None, "features": feat_info,
            "best_epoch": res.best_epoch, "val_mse": res.best_val, "history": res.history,
            "training": training, "seed": runtime.seed, "torch": torch.__version__}
    if not ddp.current().is_main:
        return metrics
    if outs.checkpoint is not None:
        save_checkpoint(net, outs.checkpoint, outs.checkpoint_meta or outs.checkpoint.with_suffix(".json"), meta)
    if outs.predictions is not None:
        # one row group per sample (column sample_id): per-sample readers read only their rows
        write_predictions(outs.predictions, ids, data.addon_genes, y, y_hat, sample_ids=sample_ids_of(ids))
    write_metrics(outs.metrics, metrics)
    finish(outs.work_dir)
    log.info("%s fold %d: test pearson %.4f spearman %.4f mse %.4f (best epoch %d of %d)", s.name, fold,
             metrics["mean"]["pearson"], metrics["mean"]["spearman"], metrics["mean"]["mse"], res.best_epoch + 1,
             res.epochs_run)
    return metrics
