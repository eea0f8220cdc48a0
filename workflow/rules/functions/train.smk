# Helper functions of train.smk (kept apart from the rules, as Snakemake's linter asks).

import os
import re

from morphomol.models import ModelSetting as _ModelSetting


def _train_setting(name):
    return _ModelSetting.from_dict(name, SETTINGS[name], source=config["experiments"]["settings_file"])


_TRAIN_KIND = {}
for _name in SETTINGS:
    _s = _train_setting(_name)
    _TRAIN_KIND[_name] = {"min_mae": "min_mae", "clip": "clip"}.get(_s.kind, "train" if _s.needs_gpu else "train_cpu")


def _train_names(kind):
    names = sorted(n for n, k in _TRAIN_KIND.items() if k == kind)
    return "|".join(re.escape(n) for n in names) if names else "(?!)"


def _train_inputs(w):
    """Every sample's stores, the fold's split + panel, cached features and weights the setting reads."""
    s = _train_setting(w.setting)
    samples = samples_of(w.cohort)

    def per_sample(name):
        return [os.path.join(SAMPLE_DIR.format(cohort=w.cohort, sample=x), name) for x in samples]

    inputs = {
        "split": f"results/{w.cohort}/splits/fold{w.fold}.parquet",
        "panel": f"results/{w.cohort}/panels/fold{w.fold}.json",
        "tiles": per_sample("tiles.zarr"),
        "tokens": per_sample("tokens.zarr"),
        "targets": per_sample("targets.parquet"),
    }
    for enc in s.cached_encoders:
        inputs[f"features_{enc}"] = [f"results/{w.cohort}/features/{enc}/{x}.zarr" for x in samples]
    weights = ((ccfg(w, "encoders") or {}).get("vit_s") or {}).get("weights")
    if s.runs_vit and weights:
        inputs["vit_weights"] = weights
    return inputs


def _feature_paths(w):
    s = _train_setting(w.setting)
    return {enc: {str(x): f"results/{w.cohort}/features/{enc}/{x}.zarr" for x in samples_of(w.cohort)}
            for enc in s.cached_encoders}


def _training_params(w):
    """The training section as the setting's kind reads it: clip_batch_size only reaches CLIP jobs,
    so changing it reruns only those (Snakemake reruns a job when its params change)."""
    cfg = dict(ccfg(w, "training") or {})
    if _TRAIN_KIND[w.setting] != "clip":
        cfg.pop("clip_batch_size", None)
    return cfg


def _train_params():
    return dict(
        setting=lambda w: dict(SETTINGS[w.setting]),
        training=_training_params,
        model=lambda w: dict(ccfg(w, "model") or {}),
        encoders=lambda w: dict(ccfg(w, "encoders") or {}),
        seed=lambda w: int(COHORTS[w.cohort].get("seed", config.get("seed", 0))),
        feature_paths=_feature_paths,
    )


def _resource(w, key, default):
    """An integer of the cohort's `resources` config section (defaults as in config/config.yaml)."""
    return int((ccfg(w, "resources") or {}).get(key, default))


def _gpu_mem(w):
    return _resource(w, "gpu_mem_mb", 32000)


def _cpu_mem(w):
    return _resource(w, "cpu_mem_mb", 4000)


def _train_runtime(w):
    return _resource(w, "train_runtime_min", 480)


def _train_threads(w):
    """CPU threads of a training job (resources.train_threads): torch intra-op threads locally,
    cpus-per-task under SLURM. Small models train faster as several 1-thread jobs side by side."""
    return _resource(w, "train_threads", 2)
