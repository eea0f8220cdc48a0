# Pre-aligned samples of xenium cohorts (sheet `format: spatialdata | hest`, morphomol.io.sheets): one job
# per sample converts the input once into the bundle layout the shared stages read
# (results/{cohort}/samples/{sample}/ingest/{format}/: experiment.xenium, transcripts.parquet in µm, the
# pre-alignment as he_imagealignment.csv and, for SpatialData, the H&E as he.ome.tif); `register` then runs
# in its prealigned mode (no refinement, QC written). Bad input (no transcripts or image, no pixel size) ->
# one InputError, nothing written. morphomol.io.sdata / morphomol.io.hest.


rule xenium_ingest_spatialdata:
    input:
        sdata=sample_field("sdata"),
    output:
        experiment=P.ingested("spatialdata", INGESTED["experiment"]),
        transcripts=P.ingested("spatialdata", INGESTED["transcripts"]),
        alignment=P.ingested("spatialdata", INGESTED["alignment"]),
        he=P.ingested("spatialdata", INGESTED["he"]),
    wildcard_constraints:
        cohort=kind_cohorts("xenium"),
    params:
        out_dir=lambda w: P.ingested("spatialdata", "", w.cohort, w.sample),
        image=sample_field("sdata_image"),
        he_mpp=sample_field("he_mpp"),
    log:
        P.log("xenium_ingest"),
    benchmark:
        P.benchmark("xenium_ingest")
    threads: 2
    resources:
        mem_mb=mem_mb(8000),
        runtime=runtime_min(120),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/xenium_ingest.py"


rule xenium_ingest_hest:
    input:
        transcripts=lambda w: hest_file(w, "transcripts"),
        metadata=lambda w: hest_file(w, "metadata"),
        he=he_path,
    output:
        experiment=P.ingested("hest", INGESTED["experiment"]),
        transcripts=P.ingested("hest", INGESTED["transcripts"]),
        alignment=P.ingested("hest", INGESTED["alignment"]),
    wildcard_constraints:
        cohort=kind_cohorts("xenium"),
    params:
        out_dir=lambda w: P.ingested("hest", "", w.cohort, w.sample),
        he_mpp=sample_field("he_mpp"),
    log:
        P.log("xenium_ingest"),
    benchmark:
        P.benchmark("xenium_ingest")
    threads: 1
    resources:
        mem_mb=mem_mb(8000),
        runtime=runtime_min(120),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/xenium_ingest.py"
