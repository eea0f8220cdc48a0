"""``morphomol predict``: a trained model applied to new samples, written as per-sample predictions AnnData.

Two kinds of trained model:

* a fusion regression setting (``results/{cohort}/fusion/runs/{setting}/fold{k}/checkpoint.safetensors``
  + ``checkpoint.json``: setting, core / add-on genes, model geometry, feature widths);
* the spots head (``results/{cohort}/spots/runs/{setting}/fold{k}/seed{s}/checkpoint.*``; its genes and
  transform come with the checkpoint and the fold's ``targets/fold{k}.json``).

The new samples must have gone through the per-sample stages of their own cohort (the unit table, the
token store (fusion) or image store, and the features the model reads: ``snakemake`` with the new
cohort configured, or only its ``units.h5ad`` / ``tokens.zarr`` / features targets). Every unit of each
sample is predicted; ``measured`` holds the targets where the sample measures the target genes (NaN
otherwise), ``fold`` is -1 and ``partition`` ``new`` (:mod:`morphomol.export.predictions`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError
from morphomol.util.jsonio import read_json
from morphomol.util.logs import get_logger
from morphomol.util.progress import progress

log = get_logger("predict")


@dataclass
class NewSample:
    """The stores of one sample to predict."""

    sample: str
    units: Path
    tokens: Path | None = None
    images: Path | None = None
    features: dict[str, Path] = field(default_factory=dict)


def long_table(ids: Sequence[str], genes: Sequence[str], y: np.ndarray, y_hat: np.ndarray) -> pd.DataFrame:
    """``tile_id, gene, y, y_hat`` (the runs' predictions layout) of dense (N, G) arrays."""
    n, g = len(ids), len(genes)
    return pd.DataFrame({"tile_id": np.repeat(np.asarray(ids, dtype=object), g),
                         "gene": np.tile(np.asarray(genes, dtype=object), n),
                         "y": np.asarray(y, np.float32).reshape(-1), "y_hat": np.asarray(y_hat, np.float32).reshape(-1)})


def _load_state(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise InputError("checkpoint not found", file=path,
                         expected="checkpoint.safetensors of a finished run (CLIP and Min-MAE runs have none)")
    return load_file(str(path))


def _setting_meta(run: Path) -> dict[str, Any]:
    """The run's ``checkpoint.json``, checked to describe a trained model (the Min-MAE baseline writes
    one without a model: it selects training tiles, there is no network to apply to new samples)."""
    meta_path = run / "checkpoint.json"
    if not meta_path.is_file():
        raise InputError("no checkpoint metadata: the run has not finished, or the setting, fold or seed is wrong",
                         file=meta_path, expected="checkpoint.json of a finished run of a trained setting")
    meta = read_json(meta_path, "checkpoint metadata")
    if not isinstance(meta, dict):
        raise InputError("checkpoint metadata is not a JSON object", file=meta_path, expected="a JSON object")
    if meta.get("kind") == "min_mae":
        raise InputError(f"setting {meta.get('setting', run.parent.name)!r} is the Min-MAE baseline: it has no model to "
                         "predict with (each target gene is copied from one core gene's log1p counts: 'source_gene' "
                         "in this file)",
                         file=meta_path, field="setting", expected="a trained regression setting (see Table A.1)")
    missing = [k for k in ("setting", "setting_fields") if k not in meta]
    if missing:
        raise InputError(f"checkpoint metadata lacks {', '.join(missing)}: not the metadata of a trained model",
                         file=meta_path, field=missing[0], expected="checkpoint.json written by a training run")
    return meta


def predict_fusion(run_dir: str | Path, samples: Sequence[NewSample], *, device: str = "cpu",
                   batch_size: int = 64) -> dict[str, pd.DataFrame]:
    """Long predictions (``tile_id, gene, y, y_hat``) of every unit of ``samples`` by one fusion run."""
    import torch

    from morphomol.config import ModelConfig, typed
    from morphomol.data.stores import StorePaths
    from morphomol.data.units import read_units
    from morphomol.models.vit import ViTEncoder
    from morphomol.studies.fusion.data import StoreSplit, frozen_vit_features
    from morphomol.studies.fusion.models import build_model
    from morphomol.studies.fusion.settings import IN_MODEL_ENCODER, ModelSetting
    from morphomol.train.runtime import autocast, to_device
    from morphomol.train.sources import WithFeatures

    run = Path(run_dir)
    meta = _setting_meta(run)
    setting = ModelSetting.from_dict(meta["setting"], meta["setting_fields"])
    if setting.kind != "regression":
        raise InputError(f"setting {setting.name} is a {setting.kind} setting: it predicts no expression",
                         file=run / "checkpoint.json", field="setting", expected="a regression setting of Table A.1")
    core, addon = list(meta["core_genes"]), list(meta["addon_genes"])
    model_cfg = typed(ModelConfig, meta["model"])
    state = _load_state(run / "checkpoint.safetensors")
    dev = torch.device(device)
    net = build_model(setting, len(core), len(addon), model_cfg, morph_dim=meta.get("morph_dim"),
                      expr_dim=meta.get("expr_dim"))
    net.load_state_dict(state, strict=True)
    net.to(dev).eval()
    rows, stores = [], {}
    for s in samples:
        if s.tokens is None:
            raise InputError(f"sample {s.sample}: no token store", field="tokens", expected="tokens.zarr of the sample")
        a = read_units(s.units, backed=True)
        try:
            ids = [str(i) for i in a.obs_names]
        finally:
            a.file.close()
        rows.append(pd.DataFrame({"tile_id": ids, "sample_id": s.sample, "patient_id": "new",
                                  "index": np.arange(len(ids)), "partition": "test"}))
        stores[s.sample] = StorePaths.of(s.tokens, s.images if "image" in setting.batch_fields else None)
    split = pd.concat(rows, ignore_index=True)
    measured = _measures(stores, addon)
    panel = {"core": core, "addon": addon if measured else []}
    ds: Any = StoreSplit(split, panel, stores, "test")
    feats: dict[str, np.ndarray] = {}
    cached: list[str] = []
    for key, enc in (("morph_feat", setting.morph_cache), ("expr_feat", setting.expr_cache)):
        if enc is None:
            continue
        paths = {s.sample: s.features[enc] for s in samples if enc in s.features}
        if len(paths) == len(samples):
            ds.with_features(key, paths)  # read per chunk with the tiles, never all rows at once
            cached.append(key)
        elif enc == IN_MODEL_ENCODER and meta.get("features", {}).get(enc) == "computed":
            torch.manual_seed(int(meta.get("seed", 0)))  # the same frozen random ViT the run computed them with
            feats[key] = frozen_vit_features(ViTEncoder(model_cfg.vit, meta.get("vit_weights")), ds, batch_size, dev)
        else:
            missing = [s.sample for s in samples if enc not in s.features]
            raise InputError(f"setting {setting.name} reads cached {enc} features; none for sample(s) {missing}",
                             field=f"features/{enc}", expected="the features rule run for the new samples")
    if feats:
        ds = WithFeatures(ds, feats)
    fields = [f for f in setting.batch_fields if f != "target" or measured] + cached + list(feats)
    ids_out, ys, yhs = [], [], []
    with torch.no_grad():
        batches = ds.epoch(0, batch_size=batch_size, fields=fields, shuffle=False)
        for batch in progress(batches, total=ds.n_batches(batch_size), desc=f"predict {setting.name}", unit="batch"):
            ids_out += list(batch["tile_id"])
            b = to_device(batch, dev)
            with autocast(dev):
                yhs.append(net(b).float().cpu().numpy())
            ys.append(b["target"].float().cpu().numpy() if measured else np.full((len(batch["tile_id"]), len(addon)), np.nan))
    y_hat = np.concatenate(yhs) if yhs else np.zeros((0, len(addon)))
    y = np.concatenate(ys) if ys else np.zeros((0, len(addon)))
    out = long_table(ids_out, addon, y, y_hat)
    return {s.sample: out[out["tile_id"].str.rpartition("__")[0] == s.sample] for s in samples}


def _measures(stores: Mapping[str, Any], genes: Sequence[str]) -> bool:
    """True when every sample's token store measures every gene of ``genes``."""
    import zarr

    for st in stores.values():
        have = set(zarr.open_group(str(st.tokens), mode="r").attrs.get("genes") or [])
        if not set(genes) <= have:
            return False
    return True


def predict_spots(run_dir: str | Path, targets: str | Path, samples: Sequence[NewSample], *, encoder: str,
                  device: str = "cpu", batch_size: int = 256) -> dict[str, pd.DataFrame]:
    """Long predictions of every spot of ``samples`` by one spots-head run (first seed's checkpoint)."""
    import torch

    from morphomol.data.features import read_features
    from morphomol.data.units import read_units
    from morphomol.studies.spots.models import SpotModel
    from morphomol.studies.spots.settings import SpotSetting
    from morphomol.studies.spots.targets import read_targets, transform_counts

    run = Path(run_dir)
    meta = _setting_meta(run)
    setting = SpotSetting.from_dict(meta["setting"], meta["setting_fields"])
    genes = list(meta["genes"])
    doc = read_targets(targets)
    state = {k: v for k, v in _load_state(run / "checkpoint.safetensors").items() if not k.startswith("align_head")}
    net = SpotModel(int(meta["in_dim"]), len(genes), setting.head, None)
    net.load_state_dict(state, strict=True)
    dev = torch.device(device)
    net.to(dev).eval()
    out = {}
    for s in progress(samples, desc=f"predict {setting.name}", unit="sample"):
        if encoder not in s.features:
            raise InputError(f"sample {s.sample}: no {encoder} features", field=f"features/{encoder}",
                             expected="the features rule run for the new samples")
        x, _ = read_features(s.features[encoder])
        if x.shape[1] != int(meta["in_dim"]):
            raise InputError(f"sample {s.sample}: {x.shape[1]}-d {encoder} features, the head reads {meta['in_dim']}",
                             file=s.features[encoder], field="dim", expected="the encoder the head was trained on")
        a = read_units(s.units)
        if a.n_obs != len(x):
            raise InputError(f"{len(x)} feature rows for {a.n_obs} units", file=s.features[encoder], field="features")
        with torch.no_grad():
            yh = np.concatenate([net({"features": torch.from_numpy(x[i:i + batch_size]).to(dev)}).float().cpu().numpy()
                                 for i in range(0, len(x), batch_size)]) if len(x) else np.zeros((0, len(genes)))
        pos = {str(g): i for i, g in enumerate(a.var_names)}
        if all(g in pos for g in genes):
            y = transform_counts(a.X[:, [pos[g] for g in genes]], a.obs["n_counts"].to_numpy(),
                                 str(doc.get("transform", "log1p")), float(doc.get("target_sum", 1e4)))
        else:
            y = np.full(yh.shape, np.nan)
        out[s.sample] = long_table([str(i) for i in a.obs_names], genes, y, yh)
    return out


def write_predictions(samples: Sequence[NewSample], predictions: Mapping[str, Mapping[str, pd.DataFrame]],
                      out_dir: str | Path, *, transform: str = "log1p") -> list[Path]:
    """``{out_dir}/{sample}.h5ad`` per sample: ``predictions`` maps setting -> sample -> long table."""
    from morphomol.data.units import read_units
    from morphomol.export.predictions import predictions_anndata
    from morphomol.util.atomic import atomic_path

    paths = []
    for s in samples:
        a = read_units(s.units)
        pa = predictions_anndata(a, {name: per[s.sample] for name, per in predictions.items()}, fold=-1,
                                 transform=transform)
        out = Path(out_dir) / f"{s.sample}.h5ad"
        with atomic_path(out) as tmp:
            pa.write_h5ad(tmp)
        paths.append(out)
        log.info("%s: %d units x %d genes predicted -> %s", s.sample, pa.n_obs, pa.n_vars, out)
    return paths


__all__ = ["NewSample", "long_table", "predict_fusion", "predict_spots", "write_predictions"]
