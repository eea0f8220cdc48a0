# Per-sample ingest / QC: stream the Xenium transcripts once, open the H&E, write qc/.
# Fails (InputError in the log, non-zero exit, no output) when a core/add-on panel gene is
# absent from the sample's transcripts; in hvg panel mode no genes are checked.


include: "functions/qc.smk"


rule qc:
    conda:
        "../../envs/morphomol.yaml"
    input:
        xenium=sample_field("xenium_dir"),
        he=sample_field("he_path"),
    output:
        directory(f"{SAMPLE_DIR}/qc"),
    params:
        qv_min=lambda w: ccfg(w, "io").get("qv_min", 20.0),
        batch_size=lambda w: int(ccfg(w, "io").get("batch_size", 2000000)),
        he_mpp=_qc_he_mpp,
        panel_genes=_qc_panel_genes,
    log:
        "results/{cohort}/logs/qc/{sample}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    script:
        "../../scripts/qc.py"
