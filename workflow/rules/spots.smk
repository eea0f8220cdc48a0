# The spots study (seed 001; morphomol.studies.spots) on visium cohorts (Space Ranger outs, legacy ST,
# HEST-1k samples):
#
#   spots_simulate   results/{cohort}/simulated/{sample}/         simulated Space Ranger layout (demo cohorts)
#   spots_units      results/{cohort}/samples/{sample}/           units.h5ad, images.zarr, spots_qc.{json,png}
#   (features)       results/{cohort}/features/{encoder}/{sample}.zarr   the shared frozen-feature cache (GPU)
#   (splits)         results/{cohort}/splits/folds.parquet               the shared patient-grouped folds
#   spots_targets    results/{cohort}/spots/targets/fold{k}.json   target genes chosen on training samples
#   spots_captions   results/{cohort}/samples/{sample}/captions_vlm.parquet   captions of a local VLM (GPU)
#   spots_text       results/{cohort}/spots/text/                  captions + sentence embeddings (cohort)
#   spots_train      results/{cohort}/spots/runs/{setting}/        every fold x seed of a setting
#   spots_baseline   results/{cohort}/spots/runs/{ridge_hest,ridge_cv,mean,depth_only}/   baselines on the same splits
#   spots_tables     results/{cohort}/spots/tables/                settings / seeds / comparisons tables, metadata
#   spots_outputs    results/{cohort}/spots/{samples,maps}/        per-sample AnnData (measured / predicted), maps
#
# Settings come from `spots.settings_file` (config/experiments/spots.yaml); settings whose encoder lacks
# weights or that align to captions a cohort does not have are not run (their table rows say why).

include: "spots_functions.smk"


rule spots_simulate:
    output:
        matrix=P.simulated("outs/filtered_feature_bc_matrix.h5"),
        positions=P.simulated("outs/spatial/tissue_positions.csv"),
        scalefactors=P.simulated("outs/spatial/scalefactors_json.json"),
        he=P.simulated("he.tif"),
        captions=P.simulated("captions.csv"),
        truth=P.simulated("truth.json"),
    wildcard_constraints:
        cohort=spots_sim_regex(),
    params:
        simulate=lambda w: cohort_of(w).simulate,
        patient_id=sample_field("patient_id"),
        he_mpp=sample_field("he_mpp"),
        config_file=lambda w: str(cohort_of(w).path),
    log:
        P.log("spots_simulate"),
    threads: 1
    resources:
        mem_mb=3000,
        runtime=15,
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/spots_simulate.py"


rule spots_units:
    input:
        unpack(spots_sample_inputs),
    output:
        units=P.units(),
        store=directory(P.image_store()),
        qc=report(P.spots_qc(), caption="../report/spots_qc.rst", category="{cohort}", subcategory="Spots QC",
                  labels={"sample": "{sample}", "file": "spots_qc.json"}),
        qc_png=report(P.spots_qc(ext="png"), caption="../report/spots_qc.rst", category="{cohort}",
                      subcategory="Spots QC", labels={"sample": "{sample}", "file": "spots_qc.png"}),
    wildcard_constraints:
        cohort=kind_cohorts("visium"),
    params:
        fmt=sample_field("format"),
        patient_id=sample_field("patient_id"),
        he_mpp=sample_field("he_mpp"),
        image_scale=sample_field("image_scale"),
        sheet=lambda w: str(cohort_of(w).sheet_path),
        spots=spots_section("patches", "geometry", "missing_spots"),
    log:
        P.log("spots_units"),
    benchmark:
        P.benchmark("spots_units")
    threads: 1
    resources:
        # one sample: its count matrix and the H&E levels the patches are read from
        mem_mb=mem_mb(2000, 1.0),
        runtime=runtime_min(20, 0.05),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/spots_units.py"


rule spots_targets:
    input:
        folds=P.folds(),
        units=lambda w: [P.units(w.cohort, s) for s in samples_of(w.cohort)],
        genes_file=lambda w: spots_cfg(w).targets.genes_file if spots_cfg(w).targets.mode == "yaml" else [],
    output:
        P.spots_targets(),
    wildcard_constraints:
        cohort=study_cohort_regex(SPOTS),
    params:
        samples=lambda w: samples_of(w.cohort),
        spots=spots_section("targets"),
    log:
        P.log("spots_targets", "fold{fold}"),
    benchmark:
        P.benchmark("spots_targets", "fold{fold}")
    threads: 1
    resources:
        # one training sample at a time (the largest unit table) + per-gene summaries
        mem_mb=spots_largest_mb(1500, 8.0, "units"),
        runtime=runtime_min(10, 0.05, "units"),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/spots_targets.py"


rule spots_captions:
    input:
        store=P.image_store(),
        units=P.units(),
        model=spots_model_dir("vlm_model"),
    output:
        P.spots_captions_vlm(),
    wildcard_constraints:
        cohort=study_cohort_regex(SPOTS),
    params:
        spots=spots_section("captions"),
        device=lambda w: cfg_of(w).features.device,
    log:
        P.log("spots_captions"),
    threads: 4
    resources:
        gpu=1,
        mem_mb=resource("gpu_mem_mb"),
        runtime=240,
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/spots_captions.py"


rule spots_text:
    input:
        units=lambda w: [P.units(w.cohort, s) for s in samples_of(w.cohort)],
        captions=lambda w: [p for _, p in spots_caption_sources(w.cohort).values()],
        model=spots_model_dir("sentence_model"),
    output:
        table=P.spots_text("captions.parquet"),
        store=directory(P.spots_text("embeddings.zarr")),
    wildcard_constraints:
        cohort=study_cohort_regex(SPOTS),
    params:
        samples=lambda w: samples_of(w.cohort),
        sources=lambda w: spots_caption_sources(w.cohort),
        spots=spots_section("captions"),
    log:
        P.log("spots_text", "text"),
    threads: 2
    resources:
        mem_mb=resource("cpu_mem_mb"),
        runtime=120,
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/spots_text.py"


rule spots_train:
    input:
        unpack(spots_train_inputs),
    output:
        metrics=P.spots_run("metrics.json"),
        predictions=P.spots_run("predictions.parquet"),
    wildcard_constraints:
        cohort=study_cohort_regex(SPOTS),
        setting=spots_setting_regex(),
    params:
        samples=lambda w: samples_of(w.cohort),
        setting=lambda w: SPOTS_SETTINGS[w.cohort][w.setting].to_dict(),
        encoder=lambda w: SPOTS_SETTINGS[w.cohort][w.setting].encoder_for(spots_cfg(w).encoder),
        spots=spots_section("training", "seeds"),
        device=lambda w: cfg_of(w).features.device if spots_cfg(w).training.gpu else "cpu",
    log:
        P.log("spots_train", "{setting}"),
    benchmark:
        P.benchmark("spots_train", "{setting}")
    threads: resource("train_threads")
    resources:
        gpu=lambda w: 1 if spots_cfg(w).training.gpu else 0,
        # a bounded buffer of spots per partition (features + targets, spots.stream.BUFFER_MB) + one fold's
        # validation / test predictions: grows with the features up to the buffers, then slowly
        mem_mb=mem_mb(2500, 1.5, "features", cap=7000),
        runtime=spots_train_runtime(),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/spots_train.py"


rule spots_baseline:
    input:
        unpack(spots_baseline_inputs),
    output:
        metrics=P.spots_run("metrics.json", setting="{baseline}"),
        predictions=P.spots_run("predictions.parquet", setting="{baseline}"),
    wildcard_constraints:
        cohort=study_cohort_regex(SPOTS),
        baseline="|".join(SPOTS_BASELINES),
    params:
        samples=lambda w: samples_of(w.cohort),
        encoder=lambda w: spots_cfg(w).encoder,
        ridge=section("ridge"),
        seed=lambda w: cfg_of(w).seed,
    log:
        P.log("spots_baseline", "{baseline}"),
    benchmark:
        P.benchmark("spots_baseline", "{baseline}")
    threads: 2
    resources:
        # out of core (studies.spots.baselines): per fold, D x D sums + one chunk of spots; what grows is one
        # fold's test targets / predictions (~half the features at 1,000 targets, 1536-d)
        mem_mb=mem_mb(2000, 1.0, "features"),
        runtime=runtime_min(20, 0.03, "features"),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/spots_baseline.py"


rule spots_tables:
    input:
        metrics=lambda w: [P.spots_run("metrics.json", w.cohort, n) for n in spots_run_names(w.cohort)],
        # the within-sample Pearson: each run's test predictions, read one sample at a time, by the fold table
        predictions=lambda w: [P.spots_run("predictions.parquet", w.cohort, n) for n in spots_run_names(w.cohort)],
        folds=P.folds(),
    output:
        settings=report(P.table(SPOTS, "spots_settings.csv"), caption="../report/spots_settings.rst",
                        category="{cohort}", subcategory="Spots tables", labels={"table": "settings and baselines"}),
        settings_md=P.table(SPOTS, "spots_settings.md"),
        settings_tex=P.table(SPOTS, "spots_settings.tex"),
        seeds=report(P.table(SPOTS, "spots_seeds.csv"), caption="../report/spots_seeds.rst", category="{cohort}",
                     subcategory="Spots tables", labels={"table": "per training seed"}),
        seeds_md=P.table(SPOTS, "spots_seeds.md"),
        seeds_tex=P.table(SPOTS, "spots_seeds.tex"),
        comparisons=report(P.table(SPOTS, "spots_comparisons.csv"), caption="../report/spots_comparisons.rst",
                           category="{cohort}", subcategory="Spots tables", labels={"table": "paired comparisons"}),
        comparisons_md=P.table(SPOTS, "spots_comparisons.md"),
        comparisons_tex=P.table(SPOTS, "spots_comparisons.tex"),
        per_gene=P.table(SPOTS, "per_gene.csv"),
        metadata=P.table(SPOTS, "run_metadata.json"),
        metadata_md=report(P.table(SPOTS, "run_metadata.md"), caption="../report/spots_metadata.rst",
                           category="{cohort}", subcategory="Spots tables", labels={"table": "run metadata"}),
        summary=report(P.table(SPOTS, "summary.png"), caption="../report/spots_settings.rst", category="{cohort}",
                       subcategory="Spots figures", labels={"figure": "test Pearson per setting"}),
    wildcard_constraints:
        cohort=study_cohort_regex(SPOTS),
    params:
        settings=lambda w: {n: s.to_dict() for n, s in SPOTS_SETTINGS[w.cohort].items()},
        reasons=lambda w: spots_reasons(w.cohort),
        reference=lambda w: spots_cfg(w).reference,
        names=lambda w: spots_run_names(w.cohort),
        transform=lambda w: spots_cfg(w).targets.transform,
        models=lambda w: spots_models_meta(w.cohort),
        config=lambda w: spots_config_meta(w.cohort),
    log:
        P.log("spots_tables", "tables"),
    threads: 1
    resources:
        # one sample's rows of one run's predictions at a time (+ per-gene sums)
        mem_mb=resource("cpu_mem_mb"),
        runtime=runtime_min(30, 0.02, "predictions"),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/spots_tables.py"


rule spots_outputs:
    input:
        unpack(lambda w: spots_common_inputs(w)),
        predictions=lambda w: [P.spots_run("predictions.parquet", w.cohort, n)
                               for n in [spots_cfg(w).reference] + spots_baselines(w.cohort)],
    output:
        samples=directory(P.spots_outputs("samples")),
        maps=report(directory(P.spots_outputs("maps")), patterns=["{name}.png"], caption="../report/spots_maps.rst",
                    category="{cohort}", subcategory="Spots figures", labels={"figure": "{name}"}),
    wildcard_constraints:
        cohort=study_cohort_regex(SPOTS),
    params:
        samples=lambda w: samples_of(w.cohort),
        names=lambda w: [spots_cfg(w).reference] + spots_baselines(w.cohort),
        reference=lambda w: spots_cfg(w).reference,
        map_samples=lambda w: spots_cfg(w).maps.samples,
    log:
        P.log("spots_outputs", "outputs"),
    benchmark:
        P.benchmark("spots_outputs", "outputs")
    threads: 1
    resources:
        # one sample at a time: its unit table and its rows of each setting's predictions
        mem_mb=spots_largest_mb(2000, 6.0, "units"),
        runtime=runtime_min(10, 0.02, "predictions"),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/spots_outputs.py"
