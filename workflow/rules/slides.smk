# The slides study (seed 003; morphomol.studies.slides) on slides cohorts (H&E whole-slide images + bulk RNA):
#
#   slides_simulate      results/{cohort}/simulated/{slides/,rna_counts.tsv,truth.parquet}   demo cohorts
#   slides_tile_<c>_<k>  results/{cohort}/samples/{sample}/{units.h5ad,images.zarr,tiles_qc.png}
#                        tissue detection + whole-slide tiling, one job per group of slides (group<k>)
#   (features)           results/{cohort}/features/{encoder}/{sample}.zarr   the shared frozen-feature cache
#   slides_embed         results/{cohort}/slides/embeddings/{group}/{sample}.zarr   per slide: mean tile vector,
#                        seeded float16 bag of <= abmil_max_tiles tiles, tile index; one job per group of
#                        `slides.tiling.group_size` slides (group0, group1, ... in sheet order)
#   (splits)             results/{cohort}/splits/folds.parquet               the shared patient-grouped folds
#   slides_rna           results/{cohort}/slides/rna/   expression.h5ad, preprocessing.json, genes.txt
#   slides_genesets      results/{cohort}/slides/genesets/   ssGSEA scores (+ null sets), sets.json, coverage.tsv
#   slides_fold          results/{cohort}/slides/runs/{setting}/fold{k}/   one job per (slide encoder, fold):
#                        trained / untrained / permuted-pairs alignment, retrieval, both prompting routes;
#                        reads the slide embeddings only (never the tile features)
#   slides_transfer      results/{cohort}/slides/transfer/{target}.json   leave-one-cohort-out + few-shot
#   slides_tables        results/{cohort}/slides/tables/   tables, predicted scores (csv + h5ad), fold ids,
#                        gene order, RNA preprocessing, plots/
#
# Groups of slides (`slides.tiling.group_size`, sheet order: group0, group1, ...) are the jobs of the per-slide
# stages: one process start per group, not per slide. Tiling must write the per-sample contract paths, and a
# wildcard rule cannot declare a group's per-slide outputs, so its rules are generated per (cohort, group)
# with concrete outputs (Snakemake's output index finds the producer of a concrete path directly: the DAG
# stays linear in the slides; a profile's `set-resources: slides_tile:` applies to all of them);
# slides_embed is one wildcard rule with a {group} wildcard whose output is the group's directory of
# per-slide embeddings, so that a fold job declares one input per group, not one per slide. Memory and
# runtime of the heavy rules follow their inputs' sizes (mem_mb / runtime_min of common.smk): the largest
# slide / store of the group for tiling and embedding, the number of slides for the cohort-level jobs
# (which read per-slide summaries: N x D vectors, bags per batch, expression by rows).


include: "slides_functions.smk"


wildcard_constraints:
    target=NAME,


rule slides_simulate:
    output:
        slides=directory(P.slides_simulated_dir()),
        rna=P.slides_simulated("rna_counts.tsv"),
        truth=P.slides_simulated("truth.parquet"),
    wildcard_constraints:
        cohort=slides_sim_regex(),
    params:
        sheet=lambda w: slides_sheet(w.cohort),
        simulate=lambda w: cohort_of(w).simulate,
        config_file=lambda w: str(cohort_of(w).path),
    log:
        P.log("slides_simulate", "simulate"),
    threads: 1
    resources:
        mem_mb=3000,
        runtime=30,
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/slides_simulate.py"


for _cohort in slides_cohorts():
    for _group, _slides in slides_groups(_cohort).items():
        _name = re.sub(r"\W", "_", f"slides_tile_{_cohort}_{_group.removeprefix('group')}")

        rule:
            name:
                _name
            input:
                unpack(slides_tile_inputs(_cohort, _slides)),
            output:
                units=[P.units(_cohort, s) for s in _slides],
                stores=[directory(P.image_store(_cohort, s)) for s in _slides],
                qc=[P.tiles_qc(_cohort, s) for s in _slides],
            params:
                samples=list(_slides),
                slides=slides_tile_fields(_cohort, _slides, "slide_path"),
                patients=slides_tile_fields(_cohort, _slides, "patient_id"),
                he_mpp=slides_tile_fields(_cohort, _slides, "he_mpp"),
                tiling=lambda w, c=_cohort: to_plain(slides_cfg(c).tiling),
                seed=lambda w, c=_cohort: cfg_of(c).seed,
            log:
                P.log("slides_tile", _group, cohort=_cohort),
            threads: 1
            resources:
                mem_mb=slides_tile_mem,
                runtime=runtime_min(10, 0.01, "slides"),
            conda:
                "../../envs/morphomol.yaml"
            script:
                "../../scripts/slides_tile.py"

        apply_profile_resources(_name, "slides_tile")


rule slides_embed:
    input:
        features=slides_group_features,
    output:
        directory(P.slides_embeddings()),
    wildcard_constraints:
        cohort=slides_cohort_regex(),
        group=r"group\d+",
    params:
        samples=slides_group_samples,
        max_tiles=lambda w: slides_cfg(w.cohort).abmil_max_tiles,
        seed=lambda w: cfg_of(w).seed,
    log:
        P.log("slides_embed", "{group}"),
    threads: 1
    resources:
        mem_mb=slides_embed_mem,
        runtime=runtime_min(5, 0.002, "features"),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/slides_embed.py"


rule slides_rna:
    input:
        unpack(slides_rna_inputs),
    output:
        expression=P.slides_rna("expression.h5ad"),
        preprocessing=P.slides_rna("preprocessing.json"),
        genes=P.slides_rna("genes.txt"),
    wildcard_constraints:
        cohort=study_cohort_regex(SLIDES),
    params:
        sheet=lambda w: slides_sheet(w.cohort),
        rna=lambda w: to_plain(slides_cfg(w.cohort).rna),
        unit_samples=lambda w: slides_pseudobulk_samples(w.cohort),
    log:
        P.log("slides_rna", "rna"),
    threads: 1
    resources:
        mem_mb=slides_rna_mem,
        runtime=runtime_min(10, 0.01, "matrix", per_sample=0.005),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/slides_rna.py"


rule slides_genesets:
    input:
        expression=P.slides_rna("expression.h5ad"),
        gmt=lambda w: list(slides_cfg(w.cohort).gene_sets.gmt),
    output:
        scores=P.slides_genesets("scores.parquet"),
        sets=P.slides_genesets("sets.json"),
        coverage=report(P.slides_genesets("coverage.tsv"), caption="../report/slides_coverage.rst",
                        category="{cohort}", subcategory="Slides: gene sets", labels={"table": "gene-set coverage"}),
    wildcard_constraints:
        cohort=study_cohort_regex(SLIDES),
    params:
        gene_sets=lambda w: to_plain(slides_cfg(w.cohort).gene_sets),
        seed=lambda w: cfg_of(w).seed,
        config_file=lambda w: str(cohort_of(w).source_of("slides") or PIPELINE.config_file),
    log:
        P.log("slides_genesets", "genesets"),
    threads: 1
    resources:
        mem_mb=mem_mb(2000, per_sample=0.02),
        runtime=runtime_min(10, per_sample=0.02),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/slides_genesets.py"


rule slides_fold:
    input:
        unpack(slides_rna_weights),
        folds=P.folds(),
        embeddings=slides_embedding_dirs,
        expression=P.slides_rna("expression.h5ad"),
        scores=P.slides_genesets("scores.parquet"),
        sets=P.slides_genesets("sets.json"),
        slide_weights=slides_slide_weights,
    output:
        metrics=P.run(SLIDES, "metrics.json"),
        predictions=P.run(SLIDES, "predictions.parquet"),
        checkpoint=P.run(SLIDES, "checkpoint.safetensors"),
        checkpoint_meta=P.run(SLIDES, "checkpoint.json"),
    wildcard_constraints:
        cohort=study_cohort_regex(SLIDES),
        setting=slides_settings_regex(),
    params:
        samples=lambda w: samples_of(w.cohort),
        embeddings=slides_embedding_paths,
        slides=section("slides"),
        seed=lambda w: cfg_of(w).seed,
        rna_overrides=slides_rna_overrides,
    log:
        P.log("slides_fold", "{setting}", "fold{fold}"),
    threads: resource("train_threads")
    resources:
        mem_mb=mem_mb(2500, per_sample=0.25),
        runtime=runtime_min(60, per_sample=0.2),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/slides_fold.py"


rule slides_transfer:
    input:
        unpack(slides_rna_weights),
        embeddings=slides_embedding_dirs,
        expression=P.slides_rna("expression.h5ad"),
        scores=P.slides_genesets("scores.parquet"),
        sets=P.slides_genesets("sets.json"),
        slide_weights=slides_slide_weights,
    output:
        P.slides_transfer(),
    wildcard_constraints:
        cohort=study_cohort_regex(SLIDES),
    params:
        samples=lambda w: samples_of(w.cohort),
        embeddings=slides_embedding_paths,
        slides=section("slides"),
        val_fraction=lambda w: cfg_of(w).splits.val_fraction,
        seed=lambda w: cfg_of(w).seed,
        rna_overrides=slides_rna_overrides,
    log:
        P.log("slides_transfer", "{target}"),
    threads: resource("train_threads")
    resources:
        mem_mb=mem_mb(2500, per_sample=0.25),
        runtime=runtime_min(60, per_sample=0.3),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/slides_transfer.py"


rule slides_tables:
    input:
        metrics=lambda w: [f"{d}/metrics.json" for ds in slides_runs(w.cohort).values() for d in ds],
        predictions=lambda w: [f"{d}/predictions.parquet" for ds in slides_runs(w.cohort).values() for d in ds],
        transfer=lambda w: [P.slides_transfer(w.cohort, t) for t in slides_transfer_targets(w.cohort)],
        folds=P.folds(),
        expression=P.slides_rna("expression.h5ad"),
        sets=P.slides_genesets("sets.json"),
        preprocessing=P.slides_rna("preprocessing.json"),
        genes=P.slides_rna("genes.txt"),
    output:
        retrieval=report(P.table(SLIDES, "retrieval.csv"), caption="../report/slides_retrieval.rst",
                         category="{cohort}", subcategory="Slides: tables", labels={"table": "retrieval"}),
        retrieval_md=P.table(SLIDES, "retrieval.md"),
        retrieval_tex=P.table(SLIDES, "retrieval.tex"),
        gene_sets=report(P.table(SLIDES, "gene_sets.csv"), caption="../report/slides_gene_sets.rst",
                         category="{cohort}", subcategory="Slides: tables", labels={"table": "per gene set"}),
        gene_sets_md=P.table(SLIDES, "gene_sets.md"),
        gene_sets_tex=P.table(SLIDES, "gene_sets.tex"),
        primary=P.table(SLIDES, "gene_sets_primary.csv"),
        primary_md=P.table(SLIDES, "gene_sets_primary.md"),
        primary_tex=P.table(SLIDES, "gene_sets_primary.tex"),
        controls=report(P.table(SLIDES, "controls.csv"), caption="../report/slides_controls.rst",
                        category="{cohort}", subcategory="Slides: tables", labels={"table": "null controls"}),
        controls_md=P.table(SLIDES, "controls.md"),
        controls_tex=P.table(SLIDES, "controls.tex"),
        transfer=report(P.table(SLIDES, "transfer.csv"), caption="../report/slides_transfer.rst",
                        category="{cohort}", subcategory="Slides: tables", labels={"table": "transfer"}),
        transfer_md=P.table(SLIDES, "transfer.md"),
        transfer_tex=P.table(SLIDES, "transfer.tex"),
        scores=report(P.table(SLIDES, "predicted_scores.csv"), caption="../report/slides_scores.rst",
                      category="{cohort}", subcategory="Slides: predicted scores", labels={"file": "csv"}),
        scores_h5ad=P.table(SLIDES, "predicted_scores.h5ad"),
        folds=report(P.table(SLIDES, "folds.tsv"), caption="../report/slides_anchors.rst", category="{cohort}",
                     subcategory="Slides: anchors", labels={"file": "fold ids"}),
        genes=P.table(SLIDES, "genes.txt"),
        preprocessing=report(P.table(SLIDES, "rna_preprocessing.json"), caption="../report/slides_anchors.rst",
                             category="{cohort}", subcategory="Slides: anchors", labels={"file": "RNA preprocessing"}),
        summary=P.table(SLIDES, "summary.json"),
        plots=report(directory(P.table(SLIDES, "plots")), patterns=["{plot}.png"],
                     caption="../report/slides_plots.rst", category="{cohort}", subcategory="Slides: figures",
                     labels={"figure": "{plot}"}),
    wildcard_constraints:
        cohort=study_cohort_regex(SLIDES),
    params:
        runs=lambda w: {s: [f"{d}/metrics.json" for d in ds] for s, ds in slides_runs(w.cohort).items()},
        predictions=lambda w: {s: [f"{d}/predictions.parquet" for d in ds] for s, ds in slides_runs(w.cohort).items()},
        slides=section("slides"),
    log:
        P.log("slides_tables", "tables"),
    threads: 1
    resources:
        mem_mb=mem_mb(2000, per_sample=0.2),
        runtime=runtime_min(15, per_sample=0.005),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/slides_tables.py"


STUDY_TARGETS[SLIDES] = slides_targets
