# Frozen-encoder feature cache and the HEST-style ridge baseline.
#
#   features: results/{cohort}/features/{encoder}/{sample}.zarr   (one GPU job per sample x encoder)
#   ridge:    results/{cohort}/runs/ridge_{encoder}/fold{fold}/{metrics.json,predictions.parquet}
#
# Image encoders read the sample's tiles.zarr; expression encoders (Geneformer) read its
# tokens.zarr (tile_counts). Weights come from `encoders: {name: {weights: path}}`; the weights
# file (or HF directory) is an input, so changing it reruns the job. Encoders without configured
# weights run only if the registry allows random init (vit_s).


include: "functions/features.smk"


rule features:
    conda:
        "../../envs/morphomol.yaml"
    input:
        unpack(_features_inputs),
    output:
        store=directory("results/{cohort}/features/{encoder}/{sample}.zarr"),
    params:
        cfg=lambda w: ccfg(w, "features"),
        encoders=lambda w: ccfg(w, "encoders"),
        model=lambda w: ccfg(w, "model"),
    log:
        "results/{cohort}/logs/features/{encoder}/{sample}.log",
    threads: 4
    resources:
        gpu=1,
        mem_mb=lambda w: int((ccfg(w, "resources") or {}).get("gpu_mem_mb", 32000)),
        runtime=120,
    script:
        "../../scripts/features.py"


rule ridge:
    conda:
        "../../envs/morphomol.yaml"
    input:
        split="results/{cohort}/splits/fold{fold}.parquet",
        panel="results/{cohort}/panels/fold{fold}.json",
        features=lambda w: [f"results/{w.cohort}/features/{w.encoder}/{s}.zarr" for s in _cohort_samples(w)],
        tokens=lambda w: [f"{SAMPLE_DIR.format(cohort=w.cohort, sample=s)}/tokens.zarr" for s in _cohort_samples(w)],
    output:
        metrics="results/{cohort}/runs/ridge_{encoder}/fold{fold}/metrics.json",
        predictions="results/{cohort}/runs/ridge_{encoder}/fold{fold}/predictions.parquet",
    params:
        cfg=lambda w: COHORTS[w.cohort].get("ridge") or {},
        samples=_cohort_samples,
        seed=lambda w: COHORTS[w.cohort].get("seed", config.get("seed", 0)),
    wildcard_constraints:
        fold=r"\d+",
    log:
        "results/{cohort}/logs/ridge/{encoder}/fold{fold}.log",
    threads: 2
    resources:
        mem_mb=lambda w: int((ccfg(w, "resources") or {}).get("cpu_mem_mb", 4000)),
        runtime=60,
    script:
        "../../scripts/ridge.py"
