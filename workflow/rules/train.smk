# Model training (Table A.1 / A.2): one job per (cohort, setting, fold).
#
#   results/{cohort}/runs/{setting}/fold{fold}/metrics.json        (kind regression | clip)
#                                              predictions.parquet (regression + Min-MAE)
#                                              checkpoint.safetensors + checkpoint.json
#
# Four rules, one per kind of job, all through morphomol.training.run_from_rule:
#   train      settings whose forward pass runs the ViT (fine-tuned, early fusion): GPU
#   train_cpu  settings on cached frozen features and/or counts only (frozen-morph late fusion,
#              frozen morph-only, expr-only): CPU, reads results/{cohort}/features/{encoder}/
#   min_mae    the Min-MAE baseline: CPU
#   clip       CLIP pretraining + recall@k: GPU
# The setting wildcard of each rule is constrained to exactly its settings' names (so
# runs/ridge_{encoder} of features.smk never matches). Which (setting, fold) pairs are built
# is decided by common.smk (runnable settings x folds).
#
# Training is preemption-safe: on SIGTERM the job writes runs/{setting}/fold{k}/resume.pt and
# exits 143; the retried job resumes from it and ends with the same metrics.

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


RUN_DIR = "results/{cohort}/runs/{setting}/fold{fold}"


def _train_inputs(w):
    """Every sample's stores, the fold's split + panel, cached features and weights the setting reads."""
    s = _train_setting(w.setting)
    samples = samples_of(w.cohort)
    inputs = {
        "split": f"results/{w.cohort}/splits/fold{w.fold}.parquet",
        "panel": f"results/{w.cohort}/panels/fold{w.fold}.json",
        "tiles": [SAMPLE_DIR.format(cohort=w.cohort, sample=x) + "/tiles.zarr" for x in samples],
        "tokens": [SAMPLE_DIR.format(cohort=w.cohort, sample=x) + "/tokens.zarr" for x in samples],
        "targets": [SAMPLE_DIR.format(cohort=w.cohort, sample=x) + "/targets.parquet" for x in samples],
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


def _train_params():
    return dict(
        setting=lambda w: dict(SETTINGS[w.setting]),
        training=lambda w: dict(ccfg(w, "training") or {}),
        model=lambda w: dict(ccfg(w, "model") or {}),
        encoders=lambda w: dict(ccfg(w, "encoders") or {}),
        seed=lambda w: int(COHORTS[w.cohort].get("seed", config.get("seed", 0))),
        feature_paths=_feature_paths,
    )


def _gpu_mem(w):
    return int((ccfg(w, "resources") or {}).get("gpu_mem_mb", 32000))


def _cpu_mem(w):
    return int((ccfg(w, "resources") or {}).get("cpu_mem_mb", 4000))


def _train_runtime(w):
    return int((ccfg(w, "resources") or {}).get("train_runtime_min", 480))


rule train:
    input:
        unpack(_train_inputs),
    output:
        metrics=RUN_DIR + "/metrics.json",
        predictions=RUN_DIR + "/predictions.parquet",
        checkpoint=RUN_DIR + "/checkpoint.safetensors",
        checkpoint_meta=RUN_DIR + "/checkpoint.json",
    wildcard_constraints:
        setting=_train_names("train"),
        fold=r"\d+",
    params:
        **_train_params(),
        num_workers=None,  # training.num_workers loader processes feed the GPU
    log:
        "results/{cohort}/logs/train/{setting}/fold{fold}.log",
    threads: 2
    resources:
        gpu=1,
        mem_mb=_gpu_mem,
        runtime=_train_runtime,
    script:
        "../../scripts/train.py"


rule train_cpu:
    input:
        unpack(_train_inputs),
    output:
        metrics=RUN_DIR + "/metrics.json",
        predictions=RUN_DIR + "/predictions.parquet",
        checkpoint=RUN_DIR + "/checkpoint.safetensors",
        checkpoint_meta=RUN_DIR + "/checkpoint.json",
    wildcard_constraints:
        setting=_train_names("train_cpu"),
        fold=r"\d+",
    params:
        **_train_params(),
        num_workers=0,  # counts + cached features: loading in the training process
    log:
        "results/{cohort}/logs/train/{setting}/fold{fold}.log",
    threads: 2
    resources:
        # cached features of every tile are held in memory (N x D float32)
        mem_mb=lambda w: max(4 * _cpu_mem(w), 16000),
        runtime=_train_runtime,
    script:
        "../../scripts/train.py"


rule min_mae:
    input:
        unpack(_train_inputs),
    output:
        metrics=RUN_DIR + "/metrics.json",
        predictions=RUN_DIR + "/predictions.parquet",
        checkpoint_meta=RUN_DIR + "/checkpoint.json",
    wildcard_constraints:
        setting=_train_names("min_mae"),
        fold=r"\d+",
    params:
        **_train_params(),
        num_workers=0,
    log:
        "results/{cohort}/logs/train/{setting}/fold{fold}.log",
    threads: 1
    resources:
        mem_mb=lambda w: max(2 * _cpu_mem(w), 8000),
        runtime=60,
    script:
        "../../scripts/minmae.py"


rule clip:
    input:
        unpack(_train_inputs),
    output:
        metrics=RUN_DIR + "/metrics.json",
        checkpoint=RUN_DIR + "/checkpoint.safetensors",
        checkpoint_meta=RUN_DIR + "/checkpoint.json",
    wildcard_constraints:
        setting=_train_names("clip"),
        fold=r"\d+",
    params:
        **_train_params(),
        num_workers=None,
    log:
        "results/{cohort}/logs/train/{setting}/fold{fold}.log",
    threads: 2
    resources:
        gpu=1,
        mem_mb=_gpu_mem,
        runtime=_train_runtime,
    script:
        "../../scripts/clip.py"
