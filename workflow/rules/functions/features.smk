# Helper functions of features.smk (kept apart from the rules, as Snakemake's linter asks).

def _encoder_entry(w):
    return (ccfg(w, "encoders") or {}).get(w.encoder) or {}


def _encoder_is_expression(w):
    from morphomol.encoders import get_spec

    return get_spec(w.encoder).kind == "expression"


def _features_inputs(w):
    store = "tokens.zarr" if _encoder_is_expression(w) else "tiles.zarr"
    inputs = {"store": "{}/{}".format(SAMPLE_DIR.format(cohort=w.cohort, sample=w.sample), store)}
    weights = _encoder_entry(w).get("weights")
    if weights:
        inputs["weights"] = weights
    return inputs


def _cohort_samples(w):
    return [str(s) for s in COHORTS[w.cohort]["samples"].index]
