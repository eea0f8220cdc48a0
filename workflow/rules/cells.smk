# The cells study (seed 000; morphomol.studies.cells) on `cells` cohorts: a QLoRA-tuned multimodal LLM
# (MedGemma-4b-it; a tiny local Gemma-3 in the demo) for cell types from expression and H&E, multi-task
# with task-ratio scheduling, against honest baselines on the same donor-grouped folds.
#
#   cells_simulate_*  results/{cohort}/simulated/{sample}/          simulated h5ad / Xenium + H&E (demo)
#   cells_register    results/{cohort}/samples/{sample}/registration.json   the fusion study's registration
#   cells_units       results/{cohort}/samples/{sample}/units.h5ad  cells x genes counts, labels, donors
#   cells_patches     results/{cohort}/samples/{sample}/images.zarr one H&E patch per cell (samples with an H&E)
#   cells_base_model  results/{cohort}/cells/base_model/            tiny Gemma-3 (cohorts with model.tiny)
#   cells_split       results/{cohort}/cells/folds/folds.parquet    donor-grouped folds (donor level, once per cohort)
#   cells_fold        results/{cohort}/cells/folds/fold{k}.{parquet,json}   the fold's HVGs and sentences (streamed)
#   cells_train       results/{cohort}/cells/runs/llm/fold{k}/      LoRA adapter, train metrics, step log (GPU)
#   cells_eval        results/{cohort}/cells/runs/{llm,untuned}/fold{k}/   both decoding modes (GPU)
#   cells_baselines   results/{cohort}/cells/runs/baselines/fold{k}/  majority, logreg, kNN, null, image (C, scaling,
#                                                                     k by inner CV over the fit donors)
#   cells_tables      results/{cohort}/cells/tables/                 seed table, ladder, modality matrix, ...
#   cells_plots       results/{cohort}/cells/tables/plots/           confusion, per-class F1, loss curves
#
# Memory of the cohort-wide jobs is bounded by a row block of the unit tables plus O(genes) (cells_fold), the fit
# cells' sparse HVG matrix plus a bounded kNN / image reference (cells_baselines), or a few bytes per cell
# (cells_split): their mem_mb / runtime grow with the unit tables' size (factors from benchmarks/scale/cells.py).
#
# Training is preemption-safe (SIGTERM / SIGUSR1 -> runs/llm/fold{k}/resume.pt, exit 143; the retried job
# resumes onto identical inputs). `cells.train.gpus: N` > 1 runs one job on N GPUs (torchrun, data parallel).

include: "cells_functions.smk"


rule cells_simulate_h5ad:
    output:
        h5ad=P.simulated("cells.h5ad"),
    wildcard_constraints:
        cohort=CELLS_SIMULATED,
    params:
        simulate=lambda w: cohort_of(w).simulate,
        patient_id=sample_field("patient_id"),
    log:
        P.log("cells_simulate"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/cells_simulate.py"


rule cells_simulate_xenium:
    output:
        matrix=P.simulated("xenium/cell_feature_matrix.h5"),
        cells=P.simulated("xenium/cells.parquet"),
        transcripts=P.simulated("xenium/transcripts.parquet"),
        experiment=P.simulated("xenium/experiment.xenium"),
        groups=P.simulated("groups.csv"),
        he=P.simulated("he.tif"),
        alignment=P.simulated("alignment.csv"),
    wildcard_constraints:
        cohort=CELLS_SIMULATED,
    params:
        simulate=lambda w: cohort_of(w).simulate,
        patient_id=sample_field("patient_id"),
    log:
        P.log("cells_simulate"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/cells_simulate.py"


rule cells_register:
    input:
        unpack(cells_register_inputs),
    output:
        registration=P.registration(),
        qc=report(P.registration_qc(), caption="../report/registration_qc.rst", category="{cohort}",
                  subcategory="Registration QC", labels={"sample": "{sample}"}),
    wildcard_constraints:
        cohort=kind_cohorts(CELLS),
    params:
        xenium_dir=xenium_dir,
        he_mpp=sample_field("he_mpp"),
        registration=section("registration"),
        io=section("io"),
        seed=lambda w: cfg_of(w).seed,
    log:
        P.log("cells_register"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/register.py"


rule cells_units:
    input:
        unpack(cells_units_inputs),
    output:
        units=P.units(),
    wildcard_constraints:
        cohort=kind_cohorts(CELLS),
    params:
        cells=section(CELLS),
        patient_id=sample_field("patient_id"),
        he_mpp=sample_field("he_mpp"),
        xenium_dir=sample_field("xenium_dir"),
    log:
        P.log("cells_units"),
    threads: 1
    resources:
        mem_mb=resource("cpu_mem_mb"),
        runtime=60,
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/cells_units.py"


rule cells_patches:
    input:
        units=P.units(),
        he=sample_field("he_path"),
    output:
        store=directory(P.image_store()),
    wildcard_constraints:
        cohort=kind_cohorts(CELLS),
    params:
        cells=section(CELLS),
        he_mpp=sample_field("he_mpp"),
    log:
        P.log("cells_patches"),
    threads: 1
    resources:
        mem_mb=resource("cpu_mem_mb"),
        runtime=60,
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/cells_patches.py"


rule cells_base_model:
    input:
        units=lambda w: cells_units(w.cohort),
        label_map=lambda w: cfg_of(w).cells.label_map,
        templates=lambda w: cfg_of(w).cells.templates,
    output:
        model=directory(P.cells_base_model()),
    wildcard_constraints:
        cohort=CELLS_TINY,
    params:
        cells=section(CELLS),
    log:
        P.log("cells_base_model", "base_model"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/cells_base_model.py"


rule cells_split:
    input:
        units=lambda w: cells_units(w.cohort),
    output:
        folds=P.cells_folds(),
    wildcard_constraints:
        cohort=kind_cohorts(CELLS),
    params:
        splits=section("splits"),
        seed=lambda w: cfg_of(w).seed,
    log:
        P.log("cells_split", "folds"),
    threads: 1
    resources:
        mem_mb=mem_mb(500, 0.01, "units"),  # a few bytes per cell (obs columns only)
        runtime=runtime_min(5, 0.0005, "units"),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/cells_split.py"


rule cells_fold:
    input:
        folds=P.cells_folds(),
        units=lambda w: cells_units(w.cohort),
    output:
        table=P.cells_fold("parquet"),
        meta=P.cells_fold("json"),
    wildcard_constraints:
        cohort=kind_cohorts(CELLS),
    params:
        cells=section(CELLS),
    log:
        P.log("cells_fold", "fold{fold}"),
    threads: 1
    resources:
        mem_mb=mem_mb(1000, 0.05, "units"),  # one row block + O(genes); obs columns of the largest sample
        runtime=runtime_min(10, 0.002, "units"),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/cells_fold.py"


rule cells_train:
    input:
        unpack(cells_model_inputs),
    output:
        adapter=directory(P.run(CELLS, "adapter", setting="llm")),
        metrics=P.run(CELLS, "train_metrics.json", setting="llm"),
        log_csv=P.run(CELLS, "train_log.csv", setting="llm"),
    wildcard_constraints:
        cohort=kind_cohorts(CELLS),
    params:
        cells=section(CELLS),
        base_model=lambda w: cells_base_model_dir(w.cohort),
        image_stores=lambda w: cells_image_stores(w.cohort),
        seed=lambda w: cfg_of(w).seed,
    log:
        P.log("cells_train", "fold{fold}"),
    benchmark:
        P.benchmark("cells_train", "fold{fold}")
    threads: resource("train_threads")
    resources:
        gpu=lambda w: cfg_of(w).cells.train.gpus,
        mem_mb=resource("gpu_mem_mb"),
        runtime=resource("train_runtime_min"),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/cells_train.py"


rule cells_eval:
    input:
        unpack(cells_eval_inputs),
    output:
        predictions=P.run(CELLS, "predictions.parquet"),
        metrics=P.run(CELLS, "metrics.json"),
    wildcard_constraints:
        cohort=kind_cohorts(CELLS),
        setting="llm|untuned",
    params:
        cells=section(CELLS),
        base_model=lambda w: cells_base_model_dir(w.cohort),
        image_stores=lambda w: cells_image_stores(w.cohort),
        seed=lambda w: cfg_of(w).seed,
    log:
        P.log("cells_eval", "{setting}", "fold{fold}"),
    threads: resource("train_threads")
    resources:
        gpu=1,
        mem_mb=resource("gpu_mem_mb"),
        runtime=resource("train_runtime_min"),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/cells_eval.py"


rule cells_baselines:
    input:
        fold_table=P.cells_fold("parquet"),
        fold_meta=P.cells_fold("json"),
        units=lambda w: cells_units(w.cohort),
        images=lambda w: list(cells_image_stores(w.cohort).values()),
    output:
        predictions=P.run(CELLS, "predictions.parquet", setting="baselines"),
        metrics=P.run(CELLS, "metrics.json", setting="baselines"),
    wildcard_constraints:
        cohort=kind_cohorts(CELLS),
    params:
        cells=section(CELLS),
        samples=lambda w: samples_of(w.cohort),
        image_stores=lambda w: cells_image_stores(w.cohort),
        seed=lambda w: cfg_of(w).seed,
    log:
        P.log("cells_baselines", "fold{fold}"),
    threads: 1
    resources:
        mem_mb=mem_mb(2500, 0.25, "units"),  # fit cells' sparse HVG matrix + bounded kNN / image reference
        runtime=runtime_min(30, 0.005, "units"),  # + the inner CV on the bounded reference (C, scaling, k)
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/cells_baselines.py"


rule cells_tables:
    input:
        runs=lambda w: [p for n in ("metrics.json", "predictions.parquet") for ps in cells_run_files(w.cohort, n).values()
                        for p in ps],
        train=lambda w: [P.run(CELLS, "train_metrics.json", w.cohort, "llm", k) for k in folds_of(w.cohort)],
        folds=lambda w: [P.cells_fold("json", w.cohort, k) for k in folds_of(w.cohort)],
    output:
        table_csv=report(P.table(CELLS, "table_cells.csv"), caption="../report/cells_table.rst", category="{cohort}",
                         subcategory="Cells study", labels={"table": "cell type accuracy (seed table)"}),
        table_md=P.table(CELLS, "table_cells.md"),
        table_tex=P.table(CELLS, "table_cells.tex"),
        ladder_csv=report(P.table(CELLS, "ladder.csv"), caption="../report/cells_ladder.rst", category="{cohort}",
                          subcategory="Cells study", labels={"table": "baseline ladder"}),
        ladder_md=P.table(CELLS, "ladder.md"),
        ladder_tex=P.table(CELLS, "ladder.tex"),
        modality_csv=report(P.table(CELLS, "modality.csv"), caption="../report/cells_modality.rst",
                            category="{cohort}", subcategory="Cells study", labels={"table": "modality matrix"}),
        modality_md=P.table(CELLS, "modality.md"),
        modality_tex=P.table(CELLS, "modality.tex"),
        per_class=P.table(CELLS, "per_class.csv"),
        confusion=P.table(CELLS, "confusion.csv"),
        summary=P.table(CELLS, "summary.json"),
        metadata=P.table(CELLS, "run_metadata.json"),
    wildcard_constraints:
        cohort=kind_cohorts(CELLS),
    params:
        metrics=lambda w: cells_run_files(w.cohort, "metrics.json"),
        predictions=lambda w: cells_run_files(w.cohort, "predictions.parquet"),
        config=lambda w: to_plain(cfg_of(w)),
        samples=lambda w: cohort_of(w).samples.astype(str).to_dict(orient="records"),
    log:
        P.log("cells_tables", "tables"),
    threads: 1
    resources:
        mem_mb=resource("cpu_mem_mb"),
        runtime=30,
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/cells_tables.py"


rule cells_plots:
    input:
        per_class=P.table(CELLS, "per_class.csv"),
        confusion=P.table(CELLS, "confusion.csv"),
        summary=P.table(CELLS, "summary.json"),
        train_logs=lambda w: [P.run(CELLS, "train_log.csv", w.cohort, "llm", k) for k in folds_of(w.cohort)],
        train=lambda w: [P.run(CELLS, "train_metrics.json", w.cohort, "llm", k) for k in folds_of(w.cohort)],
    output:
        plots=report(directory(P.table(CELLS, "plots")), patterns=["{plot}.png"], caption="../report/cells_plots.rst",
                     category="{cohort}", subcategory="Cells study", labels={"figure": "{plot}"}),
    wildcard_constraints:
        cohort=kind_cohorts(CELLS),
    log:
        P.log("cells_tables", "plots"),
    threads: 1
    resources:
        mem_mb=resource("cpu_mem_mb"),
        runtime=30,
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/cells_plots.py"
