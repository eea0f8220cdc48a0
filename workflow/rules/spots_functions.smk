# Helper functions of spots.smk (kept apart from the rules, as Snakemake's linter asks). Torch-free.

from morphomol.studies.spots.layout import resolve_model_dir, sample_input_files
from morphomol.studies.spots.settings import BASELINES as SPOTS_BASELINES
from morphomol.studies.spots.settings import load_settings as load_spots_settings

SPOTS = "spots"
SPOTS_SETTINGS = {c: load_spots_settings(cfg_of(c).spots.settings_file) for c in study_cohorts(SPOTS)}


def spots_cfg(w):
    return cfg_of(w).spots


def spots_section(*keys):
    """Params function: the parts of the `spots` section a rule reads (so that changing, e.g., the training
    options does not rerun patch extraction); the script rebuilds SpotsConfig with defaults for the rest."""

    def get(w):
        sp = cfg_of(w).spots
        return {k: to_plain(getattr(sp, k)) for k in keys}

    return get


def spots_sim_regex():
    """Visium cohorts whose inputs the spots_simulate rule writes."""
    names = sorted(re.escape(c) for c, co in COHORTS.items() if co.kind.name == "visium" and co.simulate is not None)
    return "|".join(names) if names else "(?!)"


def spots_setting_regex():
    names = sorted({re.escape(n) for s in SPOTS_SETTINGS.values() for n in s})
    return "|".join(names) if names else "(?!)"


def spots_sample_inputs(w):
    """The files of the sample's layout (by its sheet `format`) and its H&E: exactly what spots_units reads."""
    c = cohort_of(w)
    files = sample_input_files(c.sample(w.sample), simulated=c.simulate is not None)
    if c.simulate is None and not Path(files.get("scalefactors", "-")).exists():
        files.pop("scalefactors", None)  # optional: µm/px then comes from the sheet or the image
    return files


def spots_has_captions(cohort):
    return cfg_of(cohort).spots.captions.source != "none"


def spots_reasons(cohort):
    """setting -> why it cannot run in this cohort (None: runnable)."""
    sp = cfg_of(cohort).spots
    weights = {n: e.weights for n, e in cfg_of(cohort).encoders.items()}
    return {n: s.not_runnable_reason(default_encoder=sp.encoder, weights=weights,
                                     has_captions=spots_has_captions(cohort))
            for n, s in SPOTS_SETTINGS[cohort].items()}


def spots_runnable(cohort):
    return [n for n, r in spots_reasons(cohort).items() if r is None]


def spots_baselines(cohort):
    """Enabled baselines; the ridge probes need the study encoder's features (weights when required)."""
    from morphomol.encoders.registry import get_spec

    sp = cfg_of(cohort).spots
    b = sp.baselines
    features_ok = not (get_spec(sp.encoder).requires_weights and not cfg_of(cohort).weights(sp.encoder))
    out = [n for n, on in (("ridge_hest", b.ridge_hest), ("ridge_cv", b.ridge_cv)) if on and features_ok]
    return out + (["mean"] if b.mean else []) + (["depth_only"] if b.depth_only else [])


def spots_model_dir(which):
    """Input function: a configured local model directory (resolved; pkg: inside an installed package)."""

    def get(w):
        value = getattr(cfg_of(w).spots.captions, which)
        return str(resolve_model_dir(value, Path.cwd())) if value else []

    return get


def spots_caption_sources(cohort):
    """sample -> (kind, path) of its captions: the sheet's CSV (source csv) or the generated table (vlm)."""
    c = cohort_of(cohort)
    source = c.cfg.spots.captions.source
    out = {}
    for s in c.sample_ids:
        if source == "csv" and c.field(s, "captions"):
            out[s] = ("csv", str(c.field(s, "captions")))
        elif source == "vlm":
            out[s] = ("vlm", P.spots_captions_vlm(cohort, s))
    return out


def spots_units_of(w):
    return {s: P.units(w.cohort, s) for s in samples_of(w.cohort)}


def spots_common_inputs(w, encoder=None):
    """Unit tables, the cohort's fold table, every fold's targets, and (with an encoder) its features per sample."""
    samples = samples_of(w.cohort)
    out = {"units": [P.units(w.cohort, s) for s in samples],
           "folds": P.folds(w.cohort),
           "targets": [P.spots_targets(w.cohort, k) for k in folds_of(w.cohort)]}
    if encoder:
        out["features"] = [P.features(w.cohort, encoder, s) for s in samples]
    return out


def spots_largest_mb(base, per_mb, name):
    """Resource function: ``mem_mb`` of a job that holds one input file of ``name`` at a time (one sample):
    ``base + per_mb × MB of the largest``, times the attempt."""
    from morphomol.util.sizes import path_size_mb, sized_mb

    def get(wildcards, input, attempt):
        files = input.get(name, [])
        largest = max([path_size_mb(f) for f in ([files] if isinstance(files, str) else files)] or [0.0])
        return sized_mb(base, per_mb, largest, attempt=attempt)

    return get


def spots_train_runtime():
    """Resource function: ``runtime`` of spots_train from its features (every fold x seed x epoch reads them)."""
    from morphomol.util.sizes import path_size_mb, sized_runtime

    def get(wildcards, input, attempt):
        sp = cfg_of(wildcards).spots
        passes = len(sp.seeds) * len(folds_of(wildcards.cohort)) * sp.training.epochs
        return sized_runtime(30, 0.0003 * passes, path_size_mb(list(input.get("features", []))), attempt=attempt)

    return get


def spots_train_inputs(w):
    s = SPOTS_SETTINGS[w.cohort][w.setting]
    out = spots_common_inputs(w, s.encoder_for(cfg_of(w).spots.encoder))
    if s.needs_captions:
        out["text_table"] = P.spots_text("captions.parquet", w.cohort)
        out["text_store"] = P.spots_text("embeddings.zarr", w.cohort)
    return out


def spots_baseline_inputs(w):
    return spots_common_inputs(w, None if w.baseline in ("mean", "depth_only") else cfg_of(w).spots.encoder)


def spots_run_names(cohort):
    return spots_runnable(cohort) + spots_baselines(cohort)


def spots_models_meta(cohort):
    """Local models named in config (paths; the tables job checksums them)."""
    sp = cfg_of(cohort).spots
    out = {f"encoder {sp.encoder}": cfg_of(cohort).weights(sp.encoder)}
    for key in ("sentence_model", "vlm_model"):
        value = getattr(sp.captions, key)
        out[key] = str(resolve_model_dir(value, Path.cwd())) if value else None
    return out


def spots_config_meta(cohort):
    """The sections a spots run reads (not other studies': their changes must not rerun the tables)."""
    c = cfg_of(cohort)
    return {k: to_plain(getattr(c, k)) for k in ("seed", "splits", "encoders", "model", "ridge", "spots")}


def spots_targets_of(cohort):
    out = []
    for s in samples_of(cohort):
        out += [P.units(cohort, s), P.spots_qc(cohort, s), P.spots_qc(cohort, s, "png")]
    out += [P.table(SPOTS, n, cohort) for n in ("spots_settings.csv", "spots_seeds.csv", "spots_comparisons.csv",
                                                 "run_metadata.json", "summary.png")]
    if cfg_of(cohort).spots.reference in spots_runnable(cohort):
        out += [P.spots_outputs("samples", cohort), P.spots_outputs("maps", cohort)]
    return out


STUDY_TARGETS[SPOTS] = spots_targets_of
