# Per-sample registration H&E -> Xenium (morphomol.registration): one affine per tissue region
# from DAPI landmarks (keypoints CSV) or a 10x alignment matrix, else image-based; residual QC,
# robust outlier flagging, image refinement. Bad input -> InputError in the log, no outputs.


def _register_inputs(w):
    """xenium + he always; alignment / regions only when the sample sheet names them."""
    samples = COHORTS[w.cohort]["samples"]
    files = {
        "xenium": sample_field("xenium_dir")(w),
        "he": sample_field("he_path")(w),
    }
    for col in ("alignment", "regions"):
        if col in samples.columns:
            value = sample_field(col)(w)
            if value is not None and str(value).strip():
                files[col] = value
    return files


def _register_he_mpp(w):
    if "he_mpp" not in COHORTS[w.cohort]["samples"].columns:
        return None
    value = sample_field("he_mpp")(w)
    return None if value is None else float(value)


rule register:
    input:
        unpack(_register_inputs),
    output:
        registration=SAMPLE_DIR + "/registration.json",
        qc=SAMPLE_DIR + "/registration_qc.png",
    params:
        cfg=lambda w: ccfg(w, "registration"),
        he_mpp=_register_he_mpp,
        qv_min=lambda w: ccfg(w, "io").get("qv_min", 20.0),
        batch_size=lambda w: int(ccfg(w, "io").get("batch_size", 2000000)),
        seed=lambda w: int(COHORTS[w.cohort].get("seed", config.get("seed", 0)) or 0),
    log:
        "results/{cohort}/logs/register/{sample}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    script:
        "../../scripts/register.py"
