# Per-sample registration H&E -> Xenium (morphomol.registration): one affine per tissue region
# from DAPI landmarks (keypoints CSV) or a 10x alignment matrix, else image-based; residual QC,
# robust outlier flagging, image refinement. Bad input -> InputError in the log, no outputs.


include: "functions/register.smk"


rule register:
    conda:
        "../../envs/morphomol.yaml"
    input:
        unpack(_register_inputs),
    output:
        registration=f"{SAMPLE_DIR}/registration.json",
        qc=report(
            f"{SAMPLE_DIR}/registration_qc.png",
            caption="../report/registration_qc.rst",
            category="{cohort}",
            subcategory="Registration QC",
            labels={"sample": "{sample}"},
        ),
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
