# Helper functions of qc.smk (kept apart from the rules, as Snakemake's linter asks).

def _qc_panel_genes(w):
    panel = COHORTS[w.cohort]["panel"]
    if panel.get("mode", "yaml") == "hvg":
        return []
    return list(panel.get("core") or []) + list(panel.get("addon") or [])


def _qc_he_mpp(w):
    # he_mpp is an optional sheet column: absent column or empty cell -> None (use the file's MPP)
    samples = COHORTS[w.cohort]["samples"]
    if "he_mpp" not in samples.columns:
        return None
    value = samples.loc[w.sample, "he_mpp"]
    return None if value is None or value != value or value == "" else float(value)
