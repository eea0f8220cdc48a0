# Per-sample ingest / QC: stream the Xenium transcripts once, open the H&E, write qc/.
# Fails (InputError in the log, non-zero exit, no output) when a core/add-on panel gene is absent
# from the sample's transcripts; in hvg panel mode no genes are checked.


rule qc:
    input:
        unpack(xenium_inputs("experiment", "transcripts")),
        he=he_path,
    output:
        directory(P.qc()),
    wildcard_constraints:
        cohort=kind_cohorts("xenium"),
    params:
        xenium_dir=xenium_dir,
        he_mpp=sample_field("he_mpp"),
        io=section("io"),
        panel_genes=lambda w: [] if cohort_of(w).panel.mode == "hvg" else [*cohort_of(w).panel.core, *cohort_of(w).panel.addon],
    log:
        P.log("qc"),
    threads: 1
    resources:
        mem_mb=mem_mb(4000),
        runtime=runtime_min(60),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/qc.py"
