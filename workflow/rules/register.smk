# Per-sample registration H&E -> Xenium (morphomol.registration): one affine per tissue region from
# DAPI landmarks (keypoints CSV) or a 10x alignment matrix, else image-based; residual QC, robust
# outlier flagging, image refinement. SpatialData / HEST samples (ingest.smk): their pre-alignment as it is
# (prealigned: no refinement; QC = transcript density over the H&E). Bad input -> InputError in the log, no outputs.


rule register:
    input:
        unpack(register_inputs),
    output:
        registration=P.registration(),
        qc=report(
            P.registration_qc(),
            caption="../report/registration_qc.rst",
            category="{cohort}",
            subcategory="Registration QC",
            labels={"sample": "{sample}"},
        ),
    wildcard_constraints:
        cohort=kind_cohorts("xenium"),
    params:
        xenium_dir=xenium_dir,
        he_mpp=sample_field("he_mpp"),
        registration=section("registration"),
        io=section("io"),
        seed=lambda w: cfg_of(w).seed,
        prealigned=lambda w: sources(w).prealigned,
    log:
        P.log("register"),
    benchmark:
        P.benchmark("register")
    threads: 1
    resources:
        mem_mb=mem_mb(4000),
        runtime=runtime_min(60),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/register.py"
