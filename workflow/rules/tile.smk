# Per sample: tissue detection + tile grid over the transcript-covered area, transcript
# counts per tile (first streaming pass), filtering, tiles.parquet + tiles.zarr + QC PNG.


include: "functions/tile.smk"


rule tile:
    conda:
        "../../envs/morphomol.yaml"
    input:
        registration=f"{SAMPLE_DIR}/registration.json",
        he=sample_field("he_path"),
        xenium=sample_field("xenium_dir"),
    output:
        tiles=f"{SAMPLE_DIR}/tiles.parquet",
        store=directory(f"{SAMPLE_DIR}/tiles.zarr"),
        qc=report(
            f"{SAMPLE_DIR}/tiles_qc.png",
            caption="../report/tiles_qc.rst",
            category="{cohort}",
            subcategory="Tiling QC",
            labels={"sample": "{sample}"},
        ),
    params:
        cfg=lambda w: ccfg(w, "tiling"),
        grid=lambda w: int(ccfg(w, "tokens").get("grid", 14)),
        io=lambda w: ccfg(w, "io"),
        he_mpp=_tile_he_mpp,
    log:
        "results/{cohort}/logs/tile/{sample}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    script:
        "../../scripts/tile.py"
