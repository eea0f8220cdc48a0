"""One setting of the spots study on every fold and seed (rule ``spots_train``).

Per (fold, seed) the head is trained by the shared loop (:func:`morphomol.train.loop.fit`: Adam = AdamW
without weight decay, constant ``spots.training.lr``, gradient clipping, early stopping on the
validation MSE, best weights kept, SIGTERM -> ``resume.pt``), then the selected model predicts the
test partition once. Each run lives in ``runs/{setting}/fold{k}/seed{s}/`` (``metrics.json``, the
first seed's ``predictions.parquet``, ``checkpoint.safetensors`` per ``spots.training.save_checkpoints``,
``resume.pt`` while interrupted); a finished run whose fingerprint (setting, training options, seed,
fold units, genes, every input's stat digest) matches is reused when the job is retried.

The job's outputs: ``runs/{setting}/metrics.json`` (every run + mean ± sd across seeds of the fold-mean
metrics) and ``runs/{setting}/predictions.parquet`` (test predictions of the first seed; every unit once;
one row group per sample with a ``sample_id`` column, so a sample's rows are read alone: :mod:`.predictions`).

Memory: the job never holds the cohort. Each partition of a fold is a :class:`~.stream.SpotStream` that reads
features and targets per chunk of spots into a bounded buffer (``buffer_mb`` per partition); what grows with
the cohort are per-spot ids and the test / validation predictions of one fold (for the metrics).
Validation Pearson per epoch gives the seed's table columns: final (last epoch), best and its epoch;
the test metrics are those of the model selected by validation MSE.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.config.sections import TrainingConfig
from morphomol.studies.spots.config import HeadTraining
from morphomol.studies.spots.data import FoldTargets, UnitRows, fold_samples, fold_targets
from morphomol.studies.spots.settings import SpotSetting
from morphomol.studies.spots.stream import BUFFER_MB, SpotStream, TextRows
from morphomol.util.jsonio import write_json
from morphomol.util.logs import get_logger

log = get_logger("spots.train")

RUN_METRICS = ("test_pearson", "test_pearson_eval", "test_spearman", "test_mse", "val_pearson_final",
               "val_pearson_best", "val_best_epoch", "best_epoch", "epochs_run", "align_cos", "align_cos_shuffled")


@dataclass
class SpotsInputs:
    """The declared inputs of a spots job (sample -> path; the cohort's fold table; one targets file per fold)."""

    units: dict[str, Path]
    features: dict[str, Path]
    folds: Path
    targets: list[Path]
    text: tuple[Path, Path] | None = None

    @property
    def n_folds(self) -> int:
        return len(self.targets)

    def artifacts(self) -> dict[str, Path]:
        out = {f"units:{s}": p for s, p in self.units.items()}
        out.update({f"features:{s}": p for s, p in self.features.items()})
        out["folds"] = self.folds
        out.update({f"targets:{k}": p for k, p in enumerate(self.targets)})
        if self.text:
            out.update({"text_table": self.text[0], "text_store": self.text[1]})
        return out


def loop_config(t: HeadTraining) -> TrainingConfig:
    """The shared loop's options for the head: constant lr (no warm-up, min_lr = lr), in-process data."""
    return TrainingConfig(epochs=t.epochs, warmup_epochs=0, batch_size=t.batch_size, lr_head=t.lr, lr_backbone=t.lr,
                          min_lr=t.lr, weight_decay=t.weight_decay, grad_clip=t.grad_clip, patience=t.patience,
                          num_workers=0, clip_batch_size=None, buffer_chunks=1, compile=False)


def _summary(values: Sequence[float | None]) -> dict[str, Any]:
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    return {"mean": float(v.mean()) if len(v) else None, "sd": float(v.std(ddof=1)) if len(v) > 1 else None,
            "n": int(len(v))}


@dataclass
class FoldSources:
    """A fold's partitions as streaming sources (samples in the unit tables' order) and its targets."""

    fold: FoldTargets
    parts: dict[str, SpotStream]

    def ids(self, part: str) -> list[str]:
        return self.parts[part].tile_ids


def fold_sources(inputs: SpotsInputs, k: int, *, text: TextRows | None, buffer_mb: float = BUFFER_MB,
                 chunk_rows: int | None = None) -> FoldSources:
    """The streaming sources of fold ``k`` (patient grouping asserted on the fold table)."""
    from morphomol.studies.spots.stream import CHUNK_ROWS

    fold = fold_targets(inputs.targets[k], k)
    by_part = fold_samples(inputs.folds, k, list(inputs.units))
    parts = {}
    for part, samples in by_part.items():
        units = {s: UnitRows(inputs.units[s], s, fold.genes) for s in samples}
        parts[part] = SpotStream(units, inputs.features, transform=fold.transform, target_sum=fold.target_sum,
                                 text=text, buffer_mb=buffer_mb, chunk_rows=chunk_rows or CHUNK_ROWS)
    return FoldSources(fold, parts)


def train_one(setting: SpotSetting, data: FoldSources, seed: int, run_dir: Path, *,
              training: HeadTraining, threads: int | None, device: str, fp: dict[str, str],
              keep_predictions: bool, save_checkpoint_file: bool, text_dim: int | None = None) -> dict[str, Any]:
    """Train and evaluate one (fold, seed) run; writes ``run_dir/metrics.json`` (+ predictions / checkpoint)."""
    import torch

    from morphomol.eval.metrics import per_gene_metrics, regression_report, summarize
    from morphomol.studies.spots.models import SpotModel, spots_loss
    from morphomol.studies.spots.predictions import write_sample_predictions
    from morphomol.train.checkpoint import save_checkpoint
    from morphomol.train.loop import finish, fit, predict
    from morphomol.train.runtime import Runtime, run_context

    tcfg = loop_config(training)
    runtime = Runtime(seed=int(seed), threads=threads, device=device, num_workers=0)
    align = setting.align
    fold = data.fold
    eval_idx = [fold.genes.index(g) for g in fold.eval_genes]
    src = dict(data.parts)
    if align is not None:  # null control: captions permuted across the fit spots that have one
        src["fit"].shuffle_text(int(seed) if align.captions == "shuffled" else None)
    fields = ["features", "target"] + (["text", "has_text"] if align is not None else [])
    steps = src["fit"].n_batches(tcfg.batch_size)
    in_dim = src["fit"].dim
    with run_context(runtime) as dev:
        torch.manual_seed(int(seed))
        model = SpotModel(in_dim, len(fold.genes), setting.head, align, text_dim=text_dim,
                          warmup_steps=int(round((align.warmup_epochs if align else 0) * steps))).to(dev)
        if training.init_bias_mean:
            with torch.no_grad():
                model.out.bias.copy_(torch.from_numpy(src["fit"].target_mean()))

        def validate(m: Any) -> tuple[float, dict[str, float]]:
            _, y, yh = predict(m, src["val"], ["features", "target"], tcfg.batch_size, dev)
            pg = per_gene_metrics(y, yh, fold.genes)
            return float(((yh - y) ** 2).mean()), {"val_pearson": summarize(pg)["pearson"],
                                                    "val_pearson_eval": float(np.nanmean(pg["pearson"].to_numpy()[eval_idx]))}

        drop_last = setting.head.batch_norm and len(src["fit"]) > tcfg.batch_size
        has_val = len(src["val"]) > 0  # none: the fold's splits.validation policy is none (fixed epochs)
        res = fit(model, src["fit"], fields, tcfg, runtime, run_dir, loss_fn=spots_loss,
                  validate=validate if has_val else None,
                  fingerprint=fp, drop_last=drop_last)
        test_fields = ["features", "target"] + (["text", "has_text"] if align is not None else [])
        uids, y, yh, te = _predict_test(model, src["test"], test_fields, tcfg.batch_size, dev)
        cos = cos_shuf = None
        if align is not None and model.align_head is not None:
            w = np.flatnonzero(te["has_text"] > 0)
            if len(w) > 1:
                with torch.no_grad():
                    p = torch.from_numpy(yh[w]).to(dev)
                    t = torch.from_numpy(te["text"][w]).to(dev)
                    perm = torch.from_numpy(np.random.default_rng([int(seed), 104729]).permutation(len(w))).to(dev)
                    cos = float(model.alignment_cosine(p, t).mean())
                    cos_shuf = float(model.alignment_cosine(p, t[perm]).mean())
    report = regression_report(y, yh, fold.genes)
    ev = regression_report(y[:, eval_idx], yh[:, eval_idx], fold.eval_genes)
    hist = res.history
    vp = [h.get("val_pearson") for h in hist] if has_val else []
    vp_f = [v if v is not None and np.isfinite(v) else -np.inf for v in vp]
    metrics = {
        "setting": setting.name, "fold": fold.fold, "seed": int(seed), "kind": "regression", "status": "ok",
        "n_fit": len(src["fit"]), "n_val": len(src["val"]), "n_test": len(src["test"]), **report,
        "eval": {"genes": fold.eval_genes, "mean": ev["mean"], "n_undefined": ev["n_undefined"]},
        "test_pearson": report["mean"]["pearson"], "test_pearson_eval": ev["mean"]["pearson"],
        "test_spearman": report["mean"]["spearman"], "test_mse": report["mean"]["mse"],
        "val_pearson_final": vp[-1] if vp else None, "val_pearson_best": max(vp_f) if vp else None,
        "val_best_epoch": int(np.argmax(vp_f)) + 1 if vp else None, "best_epoch": res.best_epoch + 1,
        "epochs_run": res.epochs_run, "val_mse": res.best_val, "validation": "val partition" if has_val else "none",
        "selection": res.selection, "history": hist, "train_seconds": res.train_seconds,
        "spots_per_second": res.tiles_per_second, "align_cos": cos, "align_cos_shuffled": cos_shuf,
        "align_weight": align.weight if align else None, "params": model.param_counts(), "device": str(dev),
        "resumed": res.resumed, "fingerprint": fp,
    }
    if keep_predictions:
        write_sample_predictions(run_dir / "predictions.parquet", uids, fold.genes, y, yh)
    if save_checkpoint_file:
        save_checkpoint(model, run_dir / "checkpoint.safetensors", run_dir / "checkpoint.json",
                        {"setting": setting.name, "setting_fields": setting.to_dict(), "fold": fold.fold,
                         "seed": int(seed), "genes": fold.genes, "in_dim": int(in_dim),
                         "best_epoch": res.best_epoch, "training": training})
    write_json(run_dir / "metrics.json", metrics)
    finish(run_dir)
    log.info("%s fold %d seed %d: test pearson %.4f (eval genes %.4f), mse %.4f; val pearson final %.4f best %.4f "
             "(epoch %s); %d epochs", setting.name, fold.fold, seed, metrics["test_pearson"],
             metrics["test_pearson_eval"], metrics["test_mse"], metrics["val_pearson_final"] or float("nan"),
             metrics["val_pearson_best"] or float("nan"), metrics["val_best_epoch"], res.epochs_run)
    return metrics


def _predict_test(model: Any, ds: SpotStream, fields: Sequence[str], batch_size: int, dev: Any
                  ) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(ids, y, y_hat) of the test partition in its order (:func:`morphomol.train.loop.predict`), plus its
    caption fields (alignment settings) gathered batch by batch."""
    from morphomol.train.loop import predict

    uids, y, yh = predict(model, ds, ["features", "target"], batch_size, dev)
    extra: dict[str, np.ndarray] = {}
    other = [f for f in fields if f not in ("features", "target")]
    if other:
        parts: dict[str, list[np.ndarray]] = {f: [] for f in other}
        for b in ds.epoch(0, batch_size=batch_size, fields=other, shuffle=False):
            for f in other:
                parts[f].append(np.asarray(b[f], np.float32))
        extra = {f: np.concatenate(v) for f, v in parts.items()}
    return uids, y, yh, extra


def run_spot_setting(setting: SpotSetting, inputs: SpotsInputs, *, out_metrics: str | Path,
                     out_predictions: str | Path, training: HeadTraining, seeds: Sequence[int], encoder: str,
                     threads: int | None = None, device: str = "auto", buffer_mb: float = BUFFER_MB,
                     chunk_rows: int | None = None) -> dict[str, Any]:
    """The rule ``spots_train``: every fold x seed of ``setting`` (see the module docstring)."""
    from morphomol.data.features import read_features_attrs
    from morphomol.data.runs import write_metrics
    from morphomol.studies.spots.predictions import concat_predictions
    from morphomol.train.resume import fingerprint
    from morphomol.util.hashing import ids_digest

    out_metrics, out_predictions = Path(out_metrics), Path(out_predictions)
    text = None
    if setting.align is not None:
        text = TextRows.read(*inputs.text) if inputs.text is not None else None
        if text is None or not any(u in text.row for s, p in inputs.units.items() for u in UnitRows(p, s, []).ids):
            from morphomol.errors import InputError

            raise InputError(f"setting {setting.name} aligns to captions but no spot has one", field="captions")
    feat_attrs = read_features_attrs(next(iter(inputs.features.values())))
    runs: list[dict[str, Any]] = []
    preds: list[Path] = []
    for k in range(inputs.n_folds):
        data = fold_sources(inputs, k, text=text, buffer_mb=buffer_mb, chunk_rows=chunk_rows)
        fold = data.fold
        for i, seed in enumerate(seeds):
            run_dir = out_metrics.parent / f"fold{k}" / f"seed{seed}"
            fp = fingerprint(setting=setting.to_dict(), training=training, seed=int(seed), fold=k, encoder=encoder,
                             fit=ids_digest(np.array(data.ids("fit"))), val=ids_digest(np.array(data.ids("val"))),
                             genes=fold.genes, inputs={**inputs.artifacts(), "targets": inputs.targets[k]})
            keep = i == 0
            save = training.save_checkpoints == "all" or (training.save_checkpoints == "first" and keep)
            m = _reuse(run_dir, fp, keep)
            if m is None:
                m = train_one(setting, data, int(seed), run_dir, training=training, threads=threads,
                              device=device, fp=fp, keep_predictions=keep, save_checkpoint_file=save,
                              text_dim=None if text is None else int(text.embeddings.shape[1]))
                m["reused"] = False
            else:
                log.info("%s fold %d seed %d: reusing the finished run in %s", setting.name, k, seed, run_dir)
                m["reused"] = True
            runs.append(m)
            if keep:
                preds.append(run_dir / "predictions.parquet")
        del data
    agg = aggregate(setting, runs, seeds=seeds, n_folds=inputs.n_folds, encoder=encoder,
                    features=feat_attrs, training=training)
    concat_predictions(preds, out_predictions)
    write_metrics(out_metrics, agg)
    return agg


def _reuse(run_dir: Path, fp: dict[str, str], need_predictions: bool) -> dict[str, Any] | None:
    f = run_dir / "metrics.json"
    if not f.exists() or (need_predictions and not (run_dir / "predictions.parquet").exists()):
        return None
    try:
        m = json.loads(f.read_text())
    except json.JSONDecodeError:
        return None
    return m if m.get("fingerprint") == fp and m.get("status") == "ok" else None


def aggregate(setting: SpotSetting, runs: list[dict[str, Any]], *, seeds: Sequence[int], n_folds: int, encoder: str,
              features: dict[str, Any], training: HeadTraining) -> dict[str, Any]:
    """The setting's ``metrics.json``: every run's scalars, the per-gene Pearson (mean over seeds) per fold,
    and per metric the mean ± sd across seeds of the fold means."""
    rows = [{"fold": r["fold"], "seed": r["seed"], **{m: r.get(m) for m in RUN_METRICS},
             "train_seconds": r.get("train_seconds"), "spots_per_second": r.get("spots_per_second"),
             "reused": r.get("reused", False)} for r in runs]
    df = pd.DataFrame(rows)
    df[list(RUN_METRICS)] = df[list(RUN_METRICS)].astype(float)
    per_seed = df.groupby("seed")[list(RUN_METRICS)].mean()
    per_gene: dict[str, dict[str, float | None]] = {}
    for k in range(n_folds):
        rs = [r for r in runs if r["fold"] == k]
        g = pd.DataFrame({r["seed"]: {gene: v["pearson"] for gene, v in r["per_gene"].items()} for r in rs})
        per_gene[str(k)] = {str(gene): (float(v) if np.isfinite(v) else None) for gene, v in g.mean(axis=1).items()}
    return {
        "setting": setting.name, "kind": "spots", "status": "ok", "role": setting.role,
        "description": setting.description, "encoder": encoder, "head": setting.to_dict()["head"],
        "align": setting.to_dict()["align"], "seeds": [int(s) for s in seeds], "n_folds": n_folds,
        "features": {k: features.get(k) for k in ("encoder", "weights_sha256", "dim", "arch", "pooling")},
        "training": training, "runs": rows, "per_seed": per_seed.reset_index().to_dict(orient="records"),
        "summary": {m: _summary(per_seed[m].tolist()) for m in RUN_METRICS},
        "per_gene_pearson": per_gene,
    }
