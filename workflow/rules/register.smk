# Per-sample registration H&E -> Xenium (morphomol.registration): one affine per tissue region from
# DAPI landmarks (keypoints CSV) or a 10x alignment matrix, else image-based; residual QC, robust
# outlier flagging, image refinement. Bad input -> InputError in the log, no outputs.


def _register_inputs(w):
    """the bundle's files and the H&E always; alignment / regions when the sample sheet names them."""
    files = {**xenium_inputs("experiment", "transcripts", "morphology")(w), "he": sample_field("he_path")(w)}
    for col in ("alignment", "regions"):
        value = sample_field(col)(w)
        if value:
            files[col] = value
    return files


rule register:
    input:
        unpack(_register_inputs),
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
    log:
        P.log("register"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/register.py"
