# Helper functions of features.smk (kept apart from the rules, as Snakemake's linter asks).


def feature_groups(cohort):
    """The cohort's samples in groups of `features.group_size` (sample-sheet order)."""
    samples, k = samples_of(cohort), max(1, int(cfg_of(cohort).features.group_size))
    return [samples[i:i + k] for i in range(0, len(samples), k)]


def runnable_encoders(cohort):
    """Registry encoders the cohort can run: those that need no weights and those whose weights are
    configured (a study asks for the ones it uses; the others' rules have no job)."""
    from morphomol.encoders.registry import list_encoders

    c = cfg_of(cohort)
    return [s.name for s in list_encoders() if not s.requires_weights or c.weights(s.name)]


def features_group_inputs(cohort, encoder, samples):
    """Input function: every sample's image store (token store for expression encoders) + the weights."""

    def get(w):
        from morphomol.encoders.registry import get_spec

        expression = get_spec(encoder).kind == "expression"
        store = P.tokens if expression else P.image_store
        inputs = {"stores": [store(cohort, s) for s in samples]}
        weights = cfg_of(cohort).weights(encoder)
        if weights:
            inputs["weights"] = weights
        return inputs

    return get


def apply_profile_resources(rule_name, profile_name):
    """Apply a profile's `set-resources: <profile_name>:` to a generated rule, exactly as Snakemake
    applies it to a rule of that name (generated rules cannot be named in a profile)."""
    from snakemake.resources import Resources

    overwrite = workflow.resource_settings.overwrite_resources.get(profile_name)
    if overwrite:
        workflow.get_rule(rule_name).resources.update(Resources.from_mapping(overwrite))
