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


def slides_tile_groups(cohort):
    """The cohort's slides in groups of `slides.tiling.group_size` (sample-sheet order)."""
    samples, k = samples_of(cohort), max(1, int(slides_cfg(cohort).tiling.group_size))
    return [samples[i:i + k] for i in range(0, len(samples), k)]


def slides_sheet(cohort):
    """Sheet rows as plain data (sample_id, patient_id, cohort, slide_path, rna_id)."""
    c = cohort_of(cohort)
    return [{"sample_id": s, "patient_id": c.field(s, "patient_id"), "cohort": c.field(s, "cohort"),
             "slide_path": c.field(s, "slide_path"), "rna_id": c.field(s, "rna_id") or s} for s in c.sample_ids]


def slides_slide_inputs(cohort, samples):
    """Input function of a tiling group: the slides it reads (the simulated directory for demo cohorts)."""

    def get(w):
        if cohort_of(cohort).simulate is not None:
            return {"simulated": P.slides_simulated_dir(cohort)}
        return {"slides": [cohort_of(cohort).field(s, "slide_path") for s in samples]}

    return get


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


def slides_features(w):
    c = w if isinstance(w, str) else w.cohort
    enc = slides_cfg(c).encoder
    return [P.features(c, enc, s) for s in samples_of(c)]


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
