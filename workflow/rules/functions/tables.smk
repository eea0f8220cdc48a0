# Helper functions of tables.smk (kept apart from the rules, as Snakemake's linter asks).

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
        setting = Path(d).parent.name
        if (SETTINGS.get(setting) or {}).get("kind", "regression") != "clip":
            out.append(f"{d}/predictions.parquet")
    return out


def tables_targets(cohort=None):
    """Final outputs of this stage (for the default target): tables, figures, metadata; cross-cohort summary
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
            value = value.reset_index(drop=value.index.name in value.columns).astype(str).to_dict(orient="records")
        cfg[key] = value
    return cfg


def _plot_samples(w):
    sheet = COHORTS[w.cohort]["samples"]
    out = {}
    for s in sheet.index:
        mpp = sheet.loc[s, "he_mpp"] if "he_mpp" in sheet.columns else None
        out[str(s)] = {"he_path": _clean(sheet.loc[s, "he_path"]), "he_mpp": _clean(mpp)}
    return out
