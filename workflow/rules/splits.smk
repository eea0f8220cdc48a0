# Per cohort: patient-grouped outer folds + grouped inner validation split (one job per
# fold; every job computes the same deterministic folds), then the core/add-on panel of
# every fold (YAML lists, or seurat_v3 HVGs on the fold's fit tiles).


include: "functions/splits.smk"


rule splits:
    conda:
        "../../envs/morphomol.yaml"
    input:
        tiles=_split_fold_ok,
    output:
        "results/{cohort}/splits/fold{fold}.parquet",
    params:
        samples=lambda w: samples_of(w.cohort),
        patients=lambda w: [str(COHORTS[w.cohort]["samples"].loc[s, "patient_id"]) for s in samples_of(w.cohort)],
        cfg=lambda w: ccfg(w, "splits"),
        seed=lambda w: int(COHORTS[w.cohort].get("seed", 0) or 0),
    log:
        "results/{cohort}/logs/splits/fold{fold}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../../scripts/splits.py"


rule panel:
    conda:
        "../../envs/morphomol.yaml"
    input:
        split="results/{cohort}/splits/fold{fold}.parquet",
        counts=lambda w: expand(f"{SAMPLE_DIR}/counts.h5ad", cohort=w.cohort, sample=samples_of(w.cohort)),
    output:
        "results/{cohort}/panels/fold{fold}.json",
    params:
        samples=lambda w: samples_of(w.cohort),
        panel=lambda w: COHORTS[w.cohort]["panel"],
        cfg=lambda w: ccfg(w, "panels"),
    log:
        "results/{cohort}/logs/panel/fold{fold}.log",
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    script:
        "../../scripts/splits.py"
