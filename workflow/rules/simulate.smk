# Simulated paired cohort (demo / tests): one Xenium bundle + H&E slide per sample, in real 10x /
# OpenSlide formats, from the cohort's `simulate` block and panel (morphomol.synthetic). Only cohorts
# with a `simulate` block request these files; their sample sheets point here.


rule simulate:
    output:
        experiment=P.simulated("xenium/experiment.xenium"),
        transcripts=P.simulated("xenium/transcripts.parquet"),
        morphology=P.simulated("xenium/morphology_focus.ome.tif"),
        cells=P.simulated("xenium/cells.parquet"),
        gene_panel=P.simulated("xenium/gene_panel.json"),
        he=P.simulated("he.tif"),
        keypoints=P.simulated("keypoints.csv"),
        alignment=P.simulated("he_imagealignment.csv"),
        regions=P.simulated("regions.geojson"),
        truth=P.simulated("truth.json"),
        truth_cells=P.simulated("truth_cells.parquet"),
    wildcard_constraints:
        cohort=kind_cohorts("xenium"),
    params:
        simulate=lambda w: cohort_of(w).simulate,
        panel=lambda w: cohort_of(w).panel.to_dict(),
        patient_id=sample_field("patient_id"),
        he_mpp=sample_field("he_mpp"),
        config_file=lambda w: str(cohort_of(w).path),
    log:
        P.log("simulate"),
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
        runtime=runtime_min(15),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/simulate.py"
