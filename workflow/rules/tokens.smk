# Per sample: pool transcripts onto the 14x14 token grid of every kept tile (second
# streaming pass): tokens.zarr (all non-control genes), counts.h5ad, targets.parquet.


rule tokens:
    input:
        tiles=SAMPLE_DIR + "/tiles.parquet",
        store=SAMPLE_DIR + "/tiles.zarr",
        registration=SAMPLE_DIR + "/registration.json",
        xenium=sample_field("xenium_dir"),
    output:
        tokens=directory(SAMPLE_DIR + "/tokens.zarr"),
        counts=SAMPLE_DIR + "/counts.h5ad",
        targets=SAMPLE_DIR + "/targets.parquet",
    params:
        io=lambda w: ccfg(w, "io"),
        tiling=lambda w: ccfg(w, "tiling"),
        panel=lambda w: COHORTS[w.cohort]["panel"],
    log:
        "results/{cohort}/logs/tokens/{sample}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    script:
        "../../scripts/tokens.py"
