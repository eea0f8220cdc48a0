# Helper functions of tile.smk (kept apart from the rules, as Snakemake's linter asks).

def _tile_he_mpp(w):
    samples = COHORTS[w.cohort]["samples"]
    if "he_mpp" not in samples.columns:
        return None
    value = samples.loc[w.sample, "he_mpp"]
    return None if value is None or value != value or value == "" else float(value)
