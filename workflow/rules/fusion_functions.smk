# Helper functions of fusion.smk (kept apart from the rules, as Snakemake's linter asks).

from morphomol.studies.fusion.settings import load_settings

FUSION = "fusion"
FUSION_SETTINGS = {c: load_settings(cfg_of(c).experiments.settings_file) for c in study_cohorts(FUSION)}


def fusion_setting(w):
    return FUSION_SETTINGS[w.cohort][w.setting]


def _fusion_job_names(job):
    """Regex of the setting names trained by one rule (a name must map to one rule in every cohort)."""
    jobs = {}
    for c, settings in FUSION_SETTINGS.items():
        for name, s in settings.items():
            if jobs.setdefault(name, s.job) != s.job:
                raise WorkflowError(f"setting '{name}' is a {jobs[name]} job in one cohort and a {s.job} job in "
                                    f"cohort '{c}': use different setting names")
    names = sorted(re.escape(n) for n, j in jobs.items() if j == job)
    return "|".join(names) if names else "(?!)"


def fusion_weights(cohort):
    """encoder -> configured local weights (None when not configured)."""
    return {name: entry.weights for name, entry in cfg_of(cohort).encoders.items()}


def fusion_runnable(cohort):
    weights = fusion_weights(cohort)
    return [n for n, s in FUSION_SETTINGS[cohort].items() if s.not_runnable_reason(weights) is None]


def fusion_ridge_encoders(cohort):
    return feature_encoders(cohort) if cfg_of(cohort).tables.ridge else []


def fusion_run_dirs(cohort):
    """(setting, fold) run directories feeding the tables: runnable settings + ridge baselines."""
    names = fusion_runnable(cohort) + [f"ridge_{e}" for e in fusion_ridge_encoders(cohort)]
    return [P.run_dir(FUSION, cohort, n, k) for n in names for k in folds_of(cohort)]


def fusion_predictions(cohort):
    """setting -> predictions.parquet of its folds (every regression run; CLIP runs have none)."""
    out = {}
    for d in fusion_run_dirs(cohort):
        name = Path(d).parent.name
        s = FUSION_SETTINGS[cohort].get(name)
        if s is None or s.kind != "clip":
            out.setdefault(name, []).append(f"{d}/predictions.parquet")
    return out


def fusion_targets(cohort):
    out = []
    for s in samples_of(cohort):
        out += [P.qc(cohort, s), P.registration(cohort, s), P.tiles(cohort, s), P.tokens(cohort, s)]
    out += [P.table(FUSION, n, cohort) for n in ("table_a1.csv", "table_a2.csv", "ttests.csv", "run_metadata.json",
                                                  "plots")]
    if fusion_predictions(cohort):
        out += [P.study_sample(FUSION, cohort, s) for s in samples_of(cohort)]
    if len(study_cohorts(FUSION)) > 1:
        out.append(P.cross_cohort("cross_cohort.csv"))
    return out


STUDY_TARGETS[FUSION] = fusion_targets


def _train_inputs(w):
    """Exactly what the run reads: the fold table (its fold expanded over the token stores' units), panel,
    every sample's token store, the image stores when the setting reads images, the cached features of its
    frozen encoders, the ViT-S weights it loads."""
    s = fusion_setting(w)
    samples = samples_of(w.cohort)
    inputs = {"folds": P.folds(w.cohort), "panel": P.panel(FUSION, w.cohort, w.fold),
              "tokens": [P.tokens(w.cohort, x) for x in samples]}
    if "image" in s.batch_fields:
        inputs["tiles"] = [P.image_store(w.cohort, x) for x in samples]
    for enc in s.cached_encoders:
        inputs[f"features_{enc}"] = [P.features(w.cohort, enc, x) for x in samples]
    weights = cfg_of(w).weights("vit_s")
    if s.runs_vit and weights:
        inputs["vit_weights"] = weights
    return inputs


def _train_cpu_mem_mb(wildcards, input, attempt):
    """mem_mb of a CPU training job: a base (model, loader chunk buffers, one batch) plus the fold's test
    predictions (tiles x targets, ~ a quarter of the cohort's token stores at 4 folds), times the attempt."""
    from morphomol.util.sizes import path_size_mb, sized_mb

    n_folds = max(1, len(folds_of(wildcards.cohort)))
    return sized_mb(2000, 1.0 / n_folds, path_size_mb(list(input.tokens)), attempt=attempt)


def _sample_share_mb(cohort, input):
    """MB of one sample's rows in the runs' predictions: their total size over the cohort's samples (every
    sample is test once per setting)."""
    from morphomol.util.sizes import path_size_mb

    return path_size_mb(list(input.predictions)) / max(1, len(samples_of(cohort)))


def sample_predictions_mem_mb(cohort):
    """mem_mb of a per-sample predictions job (samples written one at a time): the largest unit table of the
    group (obs, spatial image) and one sample's rows of the predictions (decoded once per setting, kept as
    dense layers), never the fold's or the cohort's."""

    def get(wildcards, input, attempt):
        from morphomol.util.sizes import path_size_mb, sized_mb

        largest = max((path_size_mb(u) for u in input.units), default=0.0)
        return sized_mb(1000, 1.0, 2.0 * largest + 2.0 * _sample_share_mb(cohort, input), attempt=attempt)

    return get


def sample_predictions_runtime(cohort):
    def get(wildcards, input, attempt):
        from morphomol.util.sizes import sized_runtime

        # row groups of other samples are skipped: time follows the samples' rows, plus the files' footers
        n = len(list(input.units))
        n_files = len(list(input.predictions))
        return sized_runtime(5, 0.01 * n, _sample_share_mb(cohort, input), per_unit_min=0.002 * n, units=n_files,
                             attempt=attempt)

    return get


def _training_section(w):
    """The training section as the setting's job reads it: clip_batch_size only reaches CLIP jobs, so
    changing it reruns only those (Snakemake reruns a job when its params change)."""
    t = to_plain(cfg_of(w).training)
    if fusion_setting(w).kind != "clip":
        t["clip_batch_size"] = None
    return t


FUSION_TRAIN_PARAMS = dict(
    setting=lambda w: fusion_setting(w).to_dict(),
    samples=lambda w: samples_of(w.cohort),
    cached=lambda w: fusion_setting(w).cached_encoders,
    training=_training_section,
    model=section("model"),
    weights=lambda w: fusion_weights(w.cohort),
    seed=lambda w: cfg_of(w).seed,
)
