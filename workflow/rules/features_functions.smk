# Helper functions of features.smk (kept apart from the rules, as Snakemake's linter asks).


def feature_groups(cohort):
    """The cohort's samples in groups of `features.group_size` (sample-sheet order)."""
    samples, k = samples_of(cohort), max(1, int(cfg_of(cohort).features.group_size))
    return [samples[i:i + k] for i in range(0, len(samples), k)]


def features_group_inputs(cohort, samples):
    """Input function: every sample's image store (token store for expression encoders) + the weights."""

    def get(w):
        from morphomol.encoders.registry import get_spec

        expression = get_spec(w.encoder).kind == "expression"
        store = P.tokens if expression else P.image_store
        inputs = {"stores": [store(cohort, s) for s in samples]}
        weights = cfg_of(cohort).weights(w.encoder)
        if weights:
            inputs["weights"] = weights
        return inputs

    return get


def _profile_resources(name):
    """A profile's `set-resources: <name>:` (parsed), for generated rules whose names differ."""
    parsed = getattr(getattr(workflow, "resource_settings", None), "_parsed_overwrite_resources", None) or {}
    return dict(parsed.get(name, {}))
