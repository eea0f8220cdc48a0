# Per sample: pool transcripts onto the 14x14 token grid of every kept tile (second
# streaming pass): tokens.zarr (all non-control genes), counts.h5ad, targets.parquet.


rule tokens:
    conda:
        "../../envs/morphomol.yaml"
    input:
        tiles=f"{SAMPLE_DIR}/tiles.parquet",
        store=f"{SAMPLE_DIR}/tiles.zarr",
        registration=f"{SAMPLE_DIR}/registration.json",
        xenium=sample_field("xenium_dir"),
    output:
        tokens=directory(f"{SAMPLE_DIR}/tokens.zarr"),
        counts=f"{SAMPLE_DIR}/counts.h5ad",
        targets=f"{SAMPLE_DIR}/targets.parquet",
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
