# Per cohort: patient-grouped outer folds + grouped inner validation split over the cohort's units
# (one job per fold; every job computes the same deterministic folds). Shared by every study: the
# units are those of each sample's unit table (units.h5ad).


rule splits:
    input:
        units=lambda w: [P.units(w.cohort, s) for s in samples_of(w.cohort)],
    output:
        P.split(),
    params:
        samples=lambda w: samples_of(w.cohort),
        patients=lambda w: [cohort_of(w).patients()[s] for s in samples_of(w.cohort)],
        splits=section("splits"),
        seed=lambda w: cfg_of(w).seed,
    log:
        P.log("splits", "fold{fold}"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/splits.py"
