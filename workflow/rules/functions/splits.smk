# Helper functions of splits.smk (kept apart from the rules, as Snakemake's linter asks).

def _split_fold_ok(w):
    k = int(w.fold)
    n = int(ccfg(w, "splits").get("n_folds", 4))
    if not 0 <= k < n:
        raise ValueError(f"fold {k} out of range for cohort {w.cohort} (n_folds={n})")
    return expand(f"{SAMPLE_DIR}/tiles.parquet", cohort=w.cohort, sample=samples_of(w.cohort))
