# The fusion study (seed 002; morphomol.studies.fusion) on xenium cohorts:
#
#   panels      results/{cohort}/fusion/panels/fold{k}.json          core / add-on genes per fold
#               (folds from splits/folds.parquet; hvg: unit tables streamed, O(genes) memory)
#   train       results/{cohort}/fusion/runs/{setting}/fold{k}/      one job per (setting, fold):
#                   metrics.json, predictions.parquet, checkpoint.safetensors + checkpoint.json
#     train        settings whose forward pass runs the ViT (fine-tuned, early fusion): GPU
#     train_cpu    settings on cached frozen features and/or counts only: CPU
#     min_mae      the Min-MAE baseline: CPU
#     clip         CLIP pretraining + recall@k (Table A.2): GPU
#   ridge       results/{cohort}/fusion/runs/ridge_{encoder}/fold{k}/  HEST-style probe on cached features
#   sample_predictions  results/{cohort}/fusion/samples/{sample}.h5ad  per-sample AnnData: layers measured,
#                   pred_<setting>; obs fold, partition (morphomol.export.predictions); a cluster job
#                   reading only the sample's rows of each predictions.parquet (one row group per sample)
#   tables      results/{cohort}/fusion/tables/  Table A.1 / A.2, per-gene, t-tests, metadata, plots/
#   cross_cohort  results/tables/cross_cohort.{csv,md}  when several fusion cohorts are configured
#
# Settings come from each cohort's `experiments.settings_file` (config/experiments/table_a1.yaml);
# settings whose encoders lack configured weights are not run (their table rows say why). Training is
# preemption-safe: SIGTERM / SIGUSR1 -> runs/{setting}/fold{k}/resume.pt + exit 143; the retried job
# resumes from it onto identical inputs and ends with the same metrics (profiles/slurm sends USR1 300 s before
# the time limit). Each run also writes history.csv and learning_curve.png (per epoch, while it trains).

include: "fusion_functions.smk"


# ------------------------------------------------------------------------------ panels
rule fusion_panel:
    input:
        folds=P.folds(),
        units=lambda w: [P.units(w.cohort, s) for s in samples_of(w.cohort)],
    output:
        P.panel(FUSION),
    wildcard_constraints:
        cohort=study_cohort_regex(FUSION),
    params:
        samples=lambda w: samples_of(w.cohort),
        panel=lambda w: cohort_of(w).panel.to_dict(),
        panels=section("panels"),
    log:
        P.log("fusion_panel", "fold{fold}"),
    threads: 1
    resources:
        # hvg: unit tables streamed in row chunks, O(genes) per sample (+ samples x genes ranks)
        mem_mb=mem_mb(1000, per_sample=0.2),
        runtime=runtime_min(10, 0.005, "units"),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/fusion_panel.py"


# ------------------------------------------------------------------------------ training
rule fusion_train:
    input:
        unpack(_train_inputs),
    output:
        metrics=P.run(FUSION, "metrics.json"),
        predictions=P.run(FUSION, "predictions.parquet"),
        checkpoint=P.run(FUSION, "checkpoint.safetensors"),
        checkpoint_meta=P.run(FUSION, "checkpoint.json"),
    wildcard_constraints:
        cohort=study_cohort_regex(FUSION),
        setting=_fusion_job_names("train"),
    params:
        **FUSION_TRAIN_PARAMS,
        num_workers=None,  # training.num_workers loader workers feed the GPU
    log:
        P.log("fusion_train", "{setting}", "fold{fold}"),
    benchmark:
        P.benchmark("fusion_train", "{setting}", "fold{fold}")
    threads: resource("train_threads")
    resources:
        gpu=resource("train_gpus"),  # > 1: data-parallel (DDP) in that many torchrun processes
        mem_mb=resource("gpu_mem_mb"),
        runtime=resource("train_runtime_min"),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/fusion_train.py"


use rule fusion_train as fusion_train_cpu with:
    wildcard_constraints:
        cohort=study_cohort_regex(FUSION),
        setting=_fusion_job_names("train_cpu"),
    params:
        **FUSION_TRAIN_PARAMS,
        num_workers=0,  # counts + cached features: loading in the training process
    log:
        P.log("fusion_train", "{setting}", "fold{fold}"),
    resources:
        # cached features are read per chunk with the tiles (the loader's shuffle buffer); what grows is
        # the fold's test predictions (tiles x targets), a fraction of the token stores
        mem_mb=_train_cpu_mem_mb,
        runtime=resource("train_runtime_min"),


rule fusion_min_mae:
    input:
        unpack(_train_inputs),
    output:
        metrics=P.run(FUSION, "metrics.json"),
        predictions=P.run(FUSION, "predictions.parquet"),
        checkpoint_meta=P.run(FUSION, "checkpoint.json"),
    wildcard_constraints:
        cohort=study_cohort_regex(FUSION),
        setting=_fusion_job_names("min_mae"),
    params:
        **FUSION_TRAIN_PARAMS,
        num_workers=0,
    log:
        P.log("fusion_train", "{setting}", "fold{fold}"),
    threads: 1
    resources:
        mem_mb=lambda w: max(2 * cfg_of(w).resources.cpu_mem_mb, 8000),
        runtime=60,
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/fusion_train.py"


rule fusion_clip:
    input:
        unpack(_train_inputs),
    output:
        metrics=P.run(FUSION, "metrics.json"),
        checkpoint=P.run(FUSION, "checkpoint.safetensors"),
        checkpoint_meta=P.run(FUSION, "checkpoint.json"),
    wildcard_constraints:
        cohort=study_cohort_regex(FUSION),
        setting=_fusion_job_names("clip"),
    params:
        **FUSION_TRAIN_PARAMS,
        num_workers=None,
    log:
        P.log("fusion_train", "{setting}", "fold{fold}"),
    benchmark:
        P.benchmark("fusion_train", "{setting}", "fold{fold}")
    threads: resource("train_threads")
    resources:
        gpu=resource("train_gpus"),  # > 1: data-parallel (DDP) in that many torchrun processes
        mem_mb=resource("gpu_mem_mb"),
        runtime=resource("train_runtime_min"),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/fusion_train.py"


# ------------------------------------------------------------------------------ ridge baseline
rule fusion_ridge:
    input:
        folds=P.folds(),
        panel=P.panel(FUSION),
        features=lambda w: [P.features(w.cohort, w.encoder, s) for s in samples_of(w.cohort)],
        units=lambda w: [P.units(w.cohort, s) for s in samples_of(w.cohort)],
    output:
        metrics=P.run(FUSION, "metrics.json", setting="ridge_{encoder}"),
        predictions=P.run(FUSION, "predictions.parquet", setting="ridge_{encoder}"),
    wildcard_constraints:
        cohort=study_cohort_regex(FUSION),
    params:
        samples=lambda w: samples_of(w.cohort),
        ridge=section("ridge"),
        seed=lambda w: cfg_of(w).seed,
    log:
        P.log("fusion_ridge", "{encoder}", "fold{fold}"),
    benchmark:
        P.benchmark("fusion_ridge", "{encoder}", "fold{fold}")
    threads: 2
    resources:
        # out of core (morphomol.baselines.ridge): D x D sums per inner fold + one chunk of tiles; what grows
        # is the fold's test targets / predictions (~6 % of the features at 100 add-on genes, 1536-d)
        mem_mb=mem_mb(1500, 0.1, "features"),
        runtime=runtime_min(20, 0.01, "features"),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/fusion_ridge.py"


# ------------------------------------------------------------------------------ per-sample predictions
# A cluster job per sample: it reads the fold table and only its own rows of each run's predictions
# (pyarrow filter on sample_id), so its memory is the sample's (sized from the sample's share of them).
# one job per group of `features.group_size` samples (sheet order), each sample written in turn (memory of
# one sample); generated per (cohort, group) with concrete outputs, like the feature jobs: a job per sample
# would give Snakemake one edge per (sample, setting, fold) into training jobs that each list every sample.
for _cohort in study_cohorts(FUSION):
    for _k, _group in enumerate(feature_groups(_cohort)):
        _name = re.sub(r"\W", "_", f"fusion_sample_predictions_{_cohort}_{_k}")

        rule:
            name:
                _name
            input:
                units=[P.units(_cohort, s) for s in _group],
                folds=P.folds(_cohort),
                predictions=lambda w, c=_cohort: [p for ps in fusion_predictions(c).values() for p in ps],
            output:
                [P.study_sample(FUSION, _cohort, s) for s in _group],
            params:
                samples=list(_group),
                predictions=lambda w, c=_cohort: fusion_predictions(c),
            log:
                P.log("fusion_sample_predictions", f"group{_k}", cohort=_cohort),
            threads: 1
            resources:
                mem_mb=sample_predictions_mem_mb(_cohort),
                runtime=sample_predictions_runtime(_cohort),
            conda:
                "../../envs/morphomol.yaml"
            script:
                "../../scripts/fusion_sample_predictions.py"

        apply_profile_resources(_name, "fusion_sample_predictions")


# ------------------------------------------------------------------------------ tables, figures
# light jobs (seconds): run inside the Snakemake process, never as cluster jobs
localrules:
    fusion_tables,
    fusion_cross_cohort,


rule fusion_tables:
    input:
        metrics=lambda w: [f"{d}/metrics.json" for d in fusion_run_dirs(w.cohort)],
    output:
        a1_csv=report(P.table(FUSION, "table_a1.csv"), caption="../report/table_a1.rst", category="{cohort}",
                      subcategory="Benchmark tables", labels={"table": "Table A.1"}),
        a1_md=P.table(FUSION, "table_a1.md"),
        a1_tex=P.table(FUSION, "table_a1.tex"),
        a2_csv=report(P.table(FUSION, "table_a2.csv"), caption="../report/table_a2.rst", category="{cohort}",
                      subcategory="Benchmark tables", labels={"table": "Table A.2"}),
        a2_md=P.table(FUSION, "table_a2.md"),
        a2_tex=P.table(FUSION, "table_a2.tex"),
        per_gene=report(P.table(FUSION, "per_gene.csv"), caption="../report/per_gene.rst", category="{cohort}",
                        subcategory="Benchmark tables", labels={"table": "per-gene metrics"}),
        ttests=report(P.table(FUSION, "ttests.csv"), caption="../report/ttests.rst", category="{cohort}",
                      subcategory="Benchmark tables", labels={"table": "paired t-tests"}),
        metadata_json=P.table(FUSION, "run_metadata.json"),
        metadata_md=report(P.table(FUSION, "run_metadata.md"), caption="../report/run_metadata.rst",
                           category="{cohort}", subcategory="Run metadata", labels={"table": "run metadata"}),
    wildcard_constraints:
        cohort=study_cohort_regex(FUSION),
    params:
        settings_file=lambda w: cfg_of(w).experiments.settings_file,
        settings=lambda w: {n: s.to_dict() for n, s in FUSION_SETTINGS[w.cohort].items()},
        weights=lambda w: fusion_weights(w.cohort),
        tables=section("tables"),
        n_folds=lambda w: len(folds_of(w.cohort)),
        config=lambda w: to_plain(cfg_of(w)),
        samples=lambda w: cohort_of(w).samples.astype(str).to_dict(orient="records"),
    log:
        P.log("fusion_tables", "tables"),
    threads: 1
    resources:
        mem_mb=resource("cpu_mem_mb"),
        runtime=30,
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/fusion_tables.py"


rule fusion_plots:
    input:
        a1=P.table(FUSION, "table_a1.csv"),
        a2=P.table(FUSION, "table_a2.csv"),
        per_gene=P.table(FUSION, "per_gene.csv"),
        predictions=lambda w: [p for ps in fusion_predictions(w.cohort).values() for p in ps],
        tiles=lambda w: [P.tiles(w.cohort, s) for s in samples_of(w.cohort)],
        tokens=lambda w: [P.tokens(w.cohort, s) for s in samples_of(w.cohort)],
        panel=lambda w: P.panel(FUSION, w.cohort, 0),
    output:
        plots=report(directory(P.table(FUSION, "plots")), patterns=["{plot}.png"], caption="../report/plots.rst",
                     category="{cohort}", subcategory="Figures", labels={"figure": "{plot}"}),
    wildcard_constraints:
        cohort=study_cohort_regex(FUSION),
    params:
        samples=lambda w: samples_of(w.cohort),
        slides=lambda w: {s: {"he_path": sample_sources(cohort_of(w), s, P).he_path,
                              "he_mpp": cohort_of(w).field(s, "he_mpp")} for s in samples_of(w.cohort)},
        predictions=lambda w: fusion_predictions(w.cohort),
        tables=section("tables"),
    log:
        P.log("fusion_tables", "plots"),
    threads: 1
    resources:
        mem_mb=resource("cpu_mem_mb"),
        runtime=60,
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/fusion_plots.py"


rule fusion_cross_cohort:
    input:
        tables=lambda w: [P.table(FUSION, "table_a1.csv", c) for c in study_cohorts(FUSION)],
    output:
        csv=P.cross_cohort("cross_cohort.csv"),
        md=report(P.cross_cohort("cross_cohort.md"), caption="../report/cross_cohort.rst", category="cross-cohort"),
    params:
        cohorts=lambda w: study_cohorts(FUSION),
    log:
        "results/logs/fusion_cross_cohort.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/fusion_tables.py"
