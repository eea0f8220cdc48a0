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

TABLES_DIR = "results/{cohort}/tables"
MIN_MAE_SETTING = next((n for n, s in SETTINGS.items() if s.get("kind") == "min_mae"), "min_mae")


def tables_ridge_runs(cohort):
    if not (ccfg(cohort, "tables") or {}).get("ridge", True):
        return []
    return [f"results/{cohort}/runs/ridge_{e}/fold{k}" for e in feature_encoders(cohort) for k in folds_of(cohort)]


def tables_run_dirs(cohort):
    """Run directories feeding the tables: every runnable (setting, fold) plus the ridge baselines."""
    return list(runnable_runs(cohort)) + tables_ridge_runs(cohort)


def tables_prediction_files(cohort):
    """predictions.parquet of the regression runs (CLIP runs have none)."""
    out = []
    for d in tables_run_dirs(cohort):
        setting = d.rstrip("/").split("/")[-2]
        if (SETTINGS.get(setting) or {}).get("kind", "regression") != "clip":
            out.append(d + "/predictions.parquet")
    return out


def tables_targets(cohort=None):
    """Final outputs of this stage (for `rule all`): tables, figures, metadata; cross-cohort summary
    when more than one cohort is configured."""
    names = [cohort] if cohort else list(COHORTS)
    out = []
    for c in names:
        d = TABLES_DIR.format(cohort=c)
        out += [f"{d}/table_a1.csv", f"{d}/table_a2.csv", f"{d}/ttests.csv", f"{d}/run_metadata.json", f"{d}/plots"]
    if cohort is None and len(COHORTS) > 1:
        out += ["results/tables/cross_cohort.csv"]
    return out


def _tables_config(w):
    """The cohort's merged config, JSON-friendly (the sample sheet as records) for run_metadata."""
    cfg = {}
    for key, value in COHORTS[w.cohort].items():
        if hasattr(value, "reset_index"):
            value = value.reset_index().astype(str).to_dict(orient="records")
        cfg[key] = value
    return cfg


def _plot_samples(w):
    sheet = COHORTS[w.cohort]["samples"]
    out = {}
    for s in sheet.index:
        mpp = sheet.loc[s, "he_mpp"] if "he_mpp" in sheet.columns else None
        out[str(s)] = {"he_path": _clean(sheet.loc[s, "he_path"]), "he_mpp": _clean(mpp)}
    return out


rule tables:
    input:
        metrics=lambda w: [d + "/metrics.json" for d in tables_run_dirs(w.cohort)],
    output:
        a1_csv=report(TABLES_DIR + "/table_a1.csv", caption="../report/table_a1.rst", category="{cohort}",
                      subcategory="Benchmark tables", labels={"table": "Table A.1"}),
        a1_md=TABLES_DIR + "/table_a1.md",
        a1_tex=TABLES_DIR + "/table_a1.tex",
        a2_csv=report(TABLES_DIR + "/table_a2.csv", caption="../report/table_a2.rst", category="{cohort}",
                      subcategory="Benchmark tables", labels={"table": "Table A.2"}),
        a2_md=TABLES_DIR + "/table_a2.md",
        a2_tex=TABLES_DIR + "/table_a2.tex",
        per_gene=report(TABLES_DIR + "/per_gene.csv", caption="../report/per_gene.rst", category="{cohort}",
                        subcategory="Benchmark tables", labels={"table": "per-gene metrics"}),
        ttests=report(TABLES_DIR + "/ttests.csv", caption="../report/ttests.rst", category="{cohort}",
                      subcategory="Benchmark tables", labels={"table": "paired t-tests"}),
        metadata_json=TABLES_DIR + "/run_metadata.json",
        metadata_md=report(TABLES_DIR + "/run_metadata.md", caption="../report/run_metadata.rst",
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
    input:
        a1=TABLES_DIR + "/table_a1.csv",
        a2=TABLES_DIR + "/table_a2.csv",
        per_gene=TABLES_DIR + "/per_gene.csv",
        predictions=lambda w: tables_prediction_files(w.cohort),
        tiles=lambda w: [SAMPLE_DIR.format(cohort=w.cohort, sample=s) + "/tiles.parquet" for s in samples_of(w.cohort)],
        tokens=lambda w: [SAMPLE_DIR.format(cohort=w.cohort, sample=s) + "/tokens.zarr" for s in samples_of(w.cohort)],
        panel="results/{cohort}/panels/fold0.json",
    output:
        plots=report(directory(TABLES_DIR + "/plots"), patterns=["{plot}.png"], caption="../report/plots.rst",
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
