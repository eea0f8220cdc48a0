# Helper functions of slides.smk (kept apart from the rules, as Snakemake's linter asks). Torch-free.

SLIDES = "slides"


def slides_cohorts():
    return study_cohorts(SLIDES)


def slides_sim_regex():
    """Regex of the slides cohorts whose inputs come from the slides_simulate rule."""
    names = sorted(re.escape(c) for c in slides_cohorts() if cohort_of(c).simulate is not None)
    return "|".join(names) if names else "(?!)"


def slides_cfg(cohort):
    return cfg_of(cohort).slides


_SLIDES_CACHE = {}


def _slides_cached(kind, cohort, build):
    """Per-cohort values computed once per Snakemake run (the DAG asks for them in every job)."""
    key = (kind, cohort)
    if key not in _SLIDES_CACHE:
        _SLIDES_CACHE[key] = build()
    return _SLIDES_CACHE[key]


def slides_cohort_regex():
    """Regex of the cohorts running the slides study (constraint of the per-slide and per-group rules)."""
    names = sorted(re.escape(c) for c in slides_cohorts())
    return "|".join(names) if names else "(?!)"


def slides_groups(cohort):
    """group name (``group{k}``) -> its slides: the cohort's slides in groups of `slides.tiling.group_size`
    (sample-sheet order); one slides_embed job per group."""

    def build():
        samples, k = samples_of(cohort), max(1, int(slides_cfg(cohort).tiling.group_size))
        return {f"group{i // k}": samples[i:i + k] for i in range(0, len(samples), k)}

    return _slides_cached("groups", cohort, build)


def slides_group_of(cohort):
    """sample -> its group name."""
    return _slides_cached("group_of", cohort,
                          lambda: {s: g for g, ss in slides_groups(cohort).items() for s in ss})


def slides_group_samples(w):
    groups = slides_groups(w.cohort)
    if w.group not in groups:
        raise WorkflowError(f"cohort '{w.cohort}' has no slide group '{w.group}' (groups group0..group{len(groups) - 1} "
                            f"of slides.tiling.group_size={slides_cfg(w.cohort).tiling.group_size} slides)")
    return groups[w.group]


def slides_sheet(cohort):
    """Sheet rows as plain data (sample_id, patient_id, cohort, slide_path, rna_id)."""

    def build():
        c = cohort_of(cohort)
        return [{"sample_id": s, "patient_id": c.field(s, "patient_id"), "cohort": c.field(s, "cohort"),
                 "slide_path": c.field(s, "slide_path"), "rna_id": c.field(s, "rna_id") or s} for s in c.sample_ids]

    return _slides_cached("sheet", cohort, build)


def slides_tile_fields(cohort, samples, column):
    """A sheet column for some slides (the sheet read once per cohort: generated rules ask for every slide)."""

    def build():
        c = cohort_of(cohort)
        if column not in c.samples.columns:
            return {}
        return {str(s): c.field(s, column) for s in c.sample_ids}

    values = _slides_cached(f"column:{column}", cohort, build)
    return [values.get(s) for s in samples]


def slides_tile_inputs(cohort, samples):
    """Input function of a tiling group: its slides (the simulated directory for demo cohorts)."""

    def get(w):
        if cohort_of(cohort).simulate is not None:
            return {"simulated": P.slides_simulated_dir(cohort)}
        return {"slides": slides_tile_fields(cohort, samples, "slide_path")}

    return get


def slides_tile_mem(w, input, attempt):
    """mem_mb of a tiling group: one slide at a time (the group's largest slide file)."""
    from morphomol.util.sizes import path_size_mb, sized_mb

    largest = max((path_size_mb(f) for f in input.get("slides", [])), default=0.0)
    return sized_mb(2000, 0.2, largest, attempt=attempt)


def slides_group_features(w):
    """Input function of ``slides_embed``: the feature stores of the group's slides."""
    enc = slides_cfg(w.cohort).encoder
    return [P.features(w.cohort, enc, s) for s in slides_group_samples(w)]


def slides_embedding_dirs(w):
    """Every group directory of per-slide embeddings of the cohort (what fold and transfer jobs read)."""
    return [P.slides_embeddings(w.cohort, g) for g in slides_groups(w.cohort)]


def slides_embedding_paths(w):
    """Each slide's embedding (inside its group's directory), in sheet order."""
    group_of = slides_group_of(w.cohort)
    return [P.slides_embedding(w.cohort, group_of[s], s) for s in samples_of(w.cohort)]


def slides_embed_mem(w, input, attempt):
    """mem_mb of slides_embed: one slide's features at a time (the group's largest store, as float32)."""
    from morphomol.util.sizes import path_size_mb, sized_mb

    largest = max((path_size_mb(f) for f in input.features), default=0.0)
    return sized_mb(1000, 3.0, largest, attempt=attempt)


def slides_rna_inputs(w):
    """The RNA matrix file, or the unit tables of the pseudo-bulk source cohort."""
    rna = slides_cfg(w.cohort).rna
    if rna.path:
        return {"matrix": rna.path}
    src = rna.pseudobulk_from
    if src not in COHORTS:
        raise WorkflowError(f"cohort '{w.cohort}': slides.rna.pseudobulk_from names '{src}', which is not a cohort of "
                            f"the configuration (cohorts: {', '.join(COHORTS)})")
    return {"units": [P.units(src, s) for s in slides_pseudobulk_samples(w.cohort)]}


def slides_rna_mem(w, input, attempt):
    """mem_mb of slides_rna: a few float32 copies of the matrix (about 3 x the text file's MB), or for pseudo-bulk
    the samples x genes sums plus the largest unit table."""
    from morphomol.util.sizes import path_size_mb, sized_mb

    if "matrix" in input.keys():
        return sized_mb(1500, 3.0, path_size_mb(input.matrix), attempt=attempt)
    largest = max((path_size_mb(f) for f in input.get("units", [])), default=0.0)
    return sized_mb(1500, 3.0, largest, per_unit_mb=0.4, units=len(samples_of(w.cohort)), attempt=attempt)


def slides_pseudobulk_samples(cohort):
    """Samples of the pseudo-bulk source cohort that the slides' rna_ids name (sheet order)."""
    rna = slides_cfg(cohort).rna
    if not rna.pseudobulk_from:
        return []
    have = set(samples_of(rna.pseudobulk_from))
    ids = [r["rna_id"] for r in slides_sheet(cohort)]
    missing = [i for i in ids if i not in have]
    if missing:
        raise WorkflowError(f"cohort '{cohort}': {len(missing)} slide(s) have no sample in the pseudo-bulk source cohort "
                            f"'{rna.pseudobulk_from}': {', '.join(missing[:5])}")
    return list(dict.fromkeys(ids))


def slides_rna_weights(w):
    """The RNA encoder's local weights as an input (none for pca)."""
    name = slides_cfg(w.cohort).rna_encoder
    weights = cfg_of(w).weights(name) if name != "pca" else None
    return {"rna_weights": weights} if weights else {}


def slides_rna_overrides(w):
    name = slides_cfg(w.cohort).rna_encoder
    return dict(cfg_of(w).encoder(name).overrides or {}) if name != "pca" else {}


def slides_slide_weights(w):
    """Local weights of frozen slide encoders among the settings (inputs)."""
    s = slides_cfg(w.cohort)
    return [s.slide_encoder_weights[p] for p in s.poolings if p in s.slide_encoder_weights]


def slides_settings_regex():
    names = sorted({re.escape(p) for c in slides_cohorts() for p in slides_cfg(c).poolings})
    return "|".join(names) if names else "(?!)"


def slides_transfer_targets(cohort):
    """Source cohorts (sheet column `cohort`) held out in turn; none with a single cohort or transfer disabled."""
    s = slides_cfg(cohort)
    cohorts = sorted(set(str(x) for x in cohort_of(cohort).samples["cohort"]))
    return cohorts if s.transfer.enabled and len(cohorts) >= 2 else []


def slides_runs(cohort):
    """setting -> its fold run directories."""
    return {p: [P.run_dir(SLIDES, cohort, p, k) for k in folds_of(cohort)] for p in slides_cfg(cohort).poolings}


def slides_table_files(cohort):
    names = [f"{t}.{e}" for t in ("retrieval", "gene_sets", "gene_sets_primary", "controls", "transfer")
             for e in ("csv", "md", "tex")]
    names += ["predicted_scores.csv", "predicted_scores.h5ad", "folds.tsv", "genes.txt", "rna_preprocessing.json",
              "summary.json"]
    return [P.table(SLIDES, n, cohort) for n in names]


def slides_targets(cohort):
    return slides_table_files(cohort) + [P.table(SLIDES, "plots", cohort)]
