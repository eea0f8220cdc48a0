# Per sample: pool transcripts onto the 14x14 token grid of every kept tile (second streaming pass):
# tokens.zarr (all non-control genes, the loader's store) and the unit table units.h5ad (tiles x
# genes counts, obsm['spatial'] in µm, uns['spatial'] the H&E in that µm frame: the per-sample contract
# every study shares; sc.pl.spatial / squidpy read it directly).


rule tokens:
    input:
        unpack(xenium_inputs("experiment", "transcripts")),
        tiles=P.tiles(),
        store=P.image_store(),
        registration=P.registration(),
        he=he_path,
    output:
        tokens=directory(P.tokens()),
        units=P.units(),
    wildcard_constraints:
        cohort=kind_cohorts("xenium"),
    params:
        xenium_dir=xenium_dir,
        patient_id=sample_field("patient_id"),
        he_mpp=sample_field("he_mpp"),
        io=section("io"),
        chunk_tiles=lambda w: cfg_of(w).tiling.chunk_tiles,
        panel=lambda w: cohort_of(w).panel.to_dict(),
    log:
        P.log("tokens"),
    benchmark:
        P.benchmark("tokens")
    threads: 1
    resources:
        mem_mb=mem_mb(4000),
        runtime=runtime_min(120),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/tokens.py"
