# Model training (Table A.1 / A.2): one job per (cohort, setting, fold).
#
#   results/{cohort}/runs/{setting}/fold{fold}/metrics.json        (kind regression | clip)
#                                              predictions.parquet (regression + Min-MAE)
#                                              checkpoint.safetensors + checkpoint.json
#
# Four rules, one per kind of job, all through morphomol.training.run_rule:
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

include: "functions/train.smk"


rule train:
    conda:
        "../../envs/morphomol.yaml"
    input:
        unpack(_train_inputs),
    output:
        metrics="results/{cohort}/runs/{setting}/fold{fold}/metrics.json",
        predictions="results/{cohort}/runs/{setting}/fold{fold}/predictions.parquet",
        checkpoint="results/{cohort}/runs/{setting}/fold{fold}/checkpoint.safetensors",
        checkpoint_meta="results/{cohort}/runs/{setting}/fold{fold}/checkpoint.json",
    wildcard_constraints:
        setting=_train_names("train"),
        fold=r"\d+",
    params:
        **_train_params(),
        num_workers=None,  # training.num_workers loader processes feed the GPU
    log:
        "results/{cohort}/logs/train/{setting}/fold{fold}.log",
    threads: _train_threads
    resources:
        gpu=1,
        mem_mb=_gpu_mem,
        runtime=_train_runtime,
    script:
        "../../scripts/train.py"


rule train_cpu:
    conda:
        "../../envs/morphomol.yaml"
    input:
        unpack(_train_inputs),
    output:
        metrics="results/{cohort}/runs/{setting}/fold{fold}/metrics.json",
        predictions="results/{cohort}/runs/{setting}/fold{fold}/predictions.parquet",
        checkpoint="results/{cohort}/runs/{setting}/fold{fold}/checkpoint.safetensors",
        checkpoint_meta="results/{cohort}/runs/{setting}/fold{fold}/checkpoint.json",
    wildcard_constraints:
        setting=_train_names("train_cpu"),
        fold=r"\d+",
    params:
        **_train_params(),
        num_workers=0,  # counts + cached features: loading in the training process
    log:
        "results/{cohort}/logs/train/{setting}/fold{fold}.log",
    threads: _train_threads
    resources:
        # cached features of every tile are held in memory (N x D float32)
        mem_mb=lambda w: max(4 * _cpu_mem(w), 16000),
        runtime=_train_runtime,
    script:
        "../../scripts/train.py"


rule min_mae:
    conda:
        "../../envs/morphomol.yaml"
    input:
        unpack(_train_inputs),
    output:
        metrics="results/{cohort}/runs/{setting}/fold{fold}/metrics.json",
        predictions="results/{cohort}/runs/{setting}/fold{fold}/predictions.parquet",
        checkpoint_meta="results/{cohort}/runs/{setting}/fold{fold}/checkpoint.json",
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
    conda:
        "../../envs/morphomol.yaml"
    input:
        unpack(_train_inputs),
    output:
        metrics="results/{cohort}/runs/{setting}/fold{fold}/metrics.json",
        checkpoint="results/{cohort}/runs/{setting}/fold{fold}/checkpoint.safetensors",
        checkpoint_meta="results/{cohort}/runs/{setting}/fold{fold}/checkpoint.json",
    wildcard_constraints:
        setting=_train_names("clip"),
        fold=r"\d+",
    params:
        **_train_params(),
        num_workers=None,
    log:
        "results/{cohort}/logs/train/{setting}/fold{fold}.log",
    threads: _train_threads
    resources:
        gpu=1,
        mem_mb=_gpu_mem,
        runtime=_train_runtime,
    script:
        "../../scripts/clip.py"
