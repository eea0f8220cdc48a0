# Helper functions of register.smk (kept apart from the rules, as Snakemake's linter asks).

def _register_inputs(w):
    """xenium + he always; alignment / regions only when the sample sheet names them."""
    samples = COHORTS[w.cohort]["samples"]
    files = {
        "xenium": sample_field("xenium_dir")(w),
        "he": sample_field("he_path")(w),
    }
    for col in ("alignment", "regions"):
        if col in samples.columns:
            value = sample_field(col)(w)
            if value is not None and str(value).strip():
                files[col] = value
    return files


def _register_he_mpp(w):
    if "he_mpp" not in COHORTS[w.cohort]["samples"].columns:
        return None
    value = sample_field("he_mpp")(w)
    return None if value is None else float(value)
