# Per-sample tissue detection and tiling: tiles.parquet (geometry, transcript counts) and the
# image store images.zarr (512 px @ 0.5 µm/px tiles resized to 224 px, chunked for the loader).


rule tile:
    input:
        unpack(xenium_inputs("experiment", "transcripts")),
        registration=P.registration(),
        he=he_path,
    output:
        tiles=P.tiles(),
        store=directory(P.image_store()),
        qc=report(
            P.tiles_qc(),
            caption="../report/tiles_qc.rst",
            category="{cohort}",
            subcategory="Tiling QC",
            labels={"sample": "{sample}"},
        ),
    wildcard_constraints:
        cohort=kind_cohorts("xenium"),
    params:
        xenium_dir=xenium_dir,
        he_mpp=sample_field("he_mpp"),
        tiling=section("tiling"),
        grid=lambda w: cfg_of(w).tokens.grid,
        io=section("io"),
    log:
        P.log("tile"),
    benchmark:
        P.benchmark("tile")
    threads: 1
    resources:
        mem_mb=mem_mb(4000),
        runtime=runtime_min(120),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/tile.py"
