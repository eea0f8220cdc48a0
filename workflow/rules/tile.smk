# Per sample: tissue detection + tile grid over the transcript-covered area, transcript
# counts per tile (first streaming pass), filtering, tiles.parquet + tiles.zarr + QC PNG.


def _tile_he_mpp(w):
    samples = COHORTS[w.cohort]["samples"]
    if "he_mpp" not in samples.columns:
        return None
    value = samples.loc[w.sample, "he_mpp"]
    return None if value is None or value != value or value == "" else float(value)


rule tile:
    input:
        registration=SAMPLE_DIR + "/registration.json",
        he=sample_field("he_path"),
        xenium=sample_field("xenium_dir"),
    output:
        tiles=SAMPLE_DIR + "/tiles.parquet",
        store=directory(SAMPLE_DIR + "/tiles.zarr"),
        qc=SAMPLE_DIR + "/tiles_qc.png",
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
