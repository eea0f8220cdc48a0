# Per cohort: every patient-grouped outer fold and its grouped inner validation split, written once by one
# job: results/{cohort}/splits/folds.parquet, one row per (fold, sample) (morphomol.splits). Shared by every
# study; a job that needs unit rows expands its fold over the units it reads (morphomol.data.folds).
# The job reads only the number of units of each unit table, so it is small at any cohort size.


rule splits:
    input:
        units=lambda w: [P.units(w.cohort, s) for s in samples_of(w.cohort)],
    output:
        P.folds(),
    params:
        samples=lambda w: samples_of(w.cohort),
        patients=lambda w: [cohort_of(w).patients()[s] for s in samples_of(w.cohort)],
        splits=section("splits"),
        seed=lambda w: cfg_of(w).seed,
    log:
        P.log("splits", "folds"),
    threads: 1
    resources:
        mem_mb=mem_mb(1000, per_sample=0.05),
        runtime=runtime_min(5, per_sample=0.002),
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/splits.py"
