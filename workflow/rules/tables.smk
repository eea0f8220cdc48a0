# Benchmark tables, statistics, figures and run metadata (one job per cohort), and the
# cross-cohort summary. Everything under results/{cohort}/tables/ is regenerated from the runs'
# metrics.json / predictions.parquet by `snakemake results/{cohort}/tables/table_a1.csv` (or `all`).
#
#   tables:       table_a1.{csv,md,tex}, table_a2.{csv,md,tex}, per_gene.csv, ttests.csv,
#                 run_metadata.{json,md}
#   plots:        plots/*.png (+ source_target_corr.csv)
#   cross_cohort: results/tables/cross_cohort.{csv,md}   (useful when several cohorts are configured)
#
# Settings that cannot run (missing weights) are not inputs; their rows say why. Ridge baselines
# (runs/ridge_{encoder}) are included for every cached-feature encoder unless `tables.ridge: false`.


include: "functions/tables.smk"


rule tables:
    conda:
        "../../envs/morphomol.yaml"
    input:
        metrics=lambda w: [f"{d}/metrics.json" for d in tables_run_dirs(w.cohort)],
    output:
        a1_csv=report(f"{TABLES_DIR}/table_a1.csv", caption="../report/table_a1.rst", category="{cohort}",
                      subcategory="Benchmark tables", labels={"table": "Table A.1"}),
        a1_md=f"{TABLES_DIR}/table_a1.md",
        a1_tex=f"{TABLES_DIR}/table_a1.tex",
        a2_csv=report(f"{TABLES_DIR}/table_a2.csv", caption="../report/table_a2.rst", category="{cohort}",
                      subcategory="Benchmark tables", labels={"table": "Table A.2"}),
        a2_md=f"{TABLES_DIR}/table_a2.md",
        a2_tex=f"{TABLES_DIR}/table_a2.tex",
        per_gene=report(f"{TABLES_DIR}/per_gene.csv", caption="../report/per_gene.rst", category="{cohort}",
                        subcategory="Benchmark tables", labels={"table": "per-gene metrics"}),
        ttests=report(f"{TABLES_DIR}/ttests.csv", caption="../report/ttests.rst", category="{cohort}",
                      subcategory="Benchmark tables", labels={"table": "paired t-tests"}),
        metadata_json=f"{TABLES_DIR}/run_metadata.json",
        metadata_md=report(f"{TABLES_DIR}/run_metadata.md", caption="../report/run_metadata.rst",
                           category="{cohort}", subcategory="Run metadata", labels={"table": "run metadata"}),
    params:
        out_dir=lambda w: TABLES_DIR.format(cohort=w.cohort),
        settings=SETTINGS,
        encoders=lambda w: ccfg(w, "encoders") or {},
        tables=lambda w: ccfg(w, "tables") or {},
        n_folds=lambda w: len(folds_of(w.cohort)),
        clip_settings=lambda w: list((ccfg(w, "experiments") or {}).get("clip_settings") or []),
        min_mae_setting=MIN_MAE_SETTING,
        config=_tables_config,
    log:
        "results/{cohort}/logs/tables/tables.log",
    threads: 1
    resources:
        mem_mb=lambda w: int((ccfg(w, "resources") or {}).get("cpu_mem_mb", 4000)),
        runtime=30,
    script:
        "../../scripts/tables.py"


rule plots:
    conda:
        "../../envs/morphomol.yaml"
    input:
        a1=f"{TABLES_DIR}/table_a1.csv",
        a2=f"{TABLES_DIR}/table_a2.csv",
        per_gene=f"{TABLES_DIR}/per_gene.csv",
        predictions=lambda w: tables_prediction_files(w.cohort),
        tiles=lambda w: [f"{SAMPLE_DIR.format(cohort=w.cohort, sample=s)}/tiles.parquet" for s in samples_of(w.cohort)],
        tokens=lambda w: [f"{SAMPLE_DIR.format(cohort=w.cohort, sample=s)}/tokens.zarr" for s in samples_of(w.cohort)],
        panel="results/{cohort}/panels/fold0.json",
    output:
        plots=report(directory(f"{TABLES_DIR}/plots"), patterns=["{plot}.png"], caption="../report/plots.rst",
                     category="{cohort}", subcategory="Figures", labels={"figure": "{plot}"}),
    params:
        samples=_plot_samples,
        sample_names=lambda w: [str(s) for s in samples_of(w.cohort)],
        tables=lambda w: ccfg(w, "tables") or {},
        min_mae_setting=MIN_MAE_SETTING,
    log:
        "results/{cohort}/logs/tables/plots.log",
    threads: 1
    resources:
        mem_mb=lambda w: int((ccfg(w, "resources") or {}).get("cpu_mem_mb", 4000)),
        runtime=60,
    script:
        "../../scripts/plots.py"


rule cross_cohort:
    conda:
        "../../envs/morphomol.yaml"
    input:
        tables=expand("results/{cohort}/tables/table_a1.csv", cohort=list(COHORTS)),
    output:
        csv=report("results/tables/cross_cohort.csv", caption="../report/cross_cohort.rst",
                   category="All cohorts", subcategory="Benchmark tables", labels={"table": "cross-cohort"}),
        md="results/tables/cross_cohort.md",
    params:
        cohorts=list(COHORTS),
    log:
        "results/logs/tables/cross_cohort.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../../scripts/tables.py"
