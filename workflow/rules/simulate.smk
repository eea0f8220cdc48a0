# Simulated paired cohort (demo / tests): one Xenium bundle + H&E slide per sample, in real
# 10x / OpenSlide formats, from the cohort's `simulate` block and panel
# (morphomol.simulate.simulate_from_config). Only cohorts with a `simulate` block request
# these files (see common.smk); their sample sheets point here.


rule simulate:
    output:
        xenium=directory("results/{cohort}/simulated/{sample}/xenium"),
        he="results/{cohort}/simulated/{sample}/he.tif",
        keypoints="results/{cohort}/simulated/{sample}/keypoints.csv",
        alignment="results/{cohort}/simulated/{sample}/he_imagealignment.csv",
        regions="results/{cohort}/simulated/{sample}/regions.geojson",
        truth="results/{cohort}/simulated/{sample}/truth.json",
    params:
        simulate=lambda w: COHORTS[w.cohort]["simulate"],
        panel=lambda w: COHORTS[w.cohort]["panel"],
        patient_id=lambda w: str(COHORTS[w.cohort]["samples"].loc[w.sample, "patient_id"]),
        he_mpp=sample_field("he_mpp"),
    log:
        "results/{cohort}/logs/simulate/{sample}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/simulate.py"
