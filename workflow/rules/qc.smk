# Per-sample ingest / QC: stream the Xenium transcripts once, open the H&E, write qc/.
# Fails (InputError in the log, non-zero exit, no output) when a core/add-on panel gene is
# absent from the sample's transcripts; in hvg panel mode no genes are checked.


def _qc_panel_genes(w):
    panel = COHORTS[w.cohort]["panel"]
    if panel.get("mode", "yaml") == "hvg":
        return []
    return list(panel.get("core") or []) + list(panel.get("addon") or [])


def _qc_he_mpp(w):
    # he_mpp is an optional sheet column: absent column or empty cell -> None (use the file's MPP)
    samples = COHORTS[w.cohort]["samples"]
    if "he_mpp" not in samples.columns:
        return None
    value = samples.loc[w.sample, "he_mpp"]
    return None if value is None or value != value or value == "" else float(value)


rule qc:
    input:
        xenium=sample_field("xenium_dir"),
        he=sample_field("he_path"),
    output:
        directory(SAMPLE_DIR + "/qc"),
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
