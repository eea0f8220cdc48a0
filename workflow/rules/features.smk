# Frozen-encoder feature cache, shared by every study: results/{cohort}/features/{encoder}/{sample}.zarr,
# rows = the sample's units, one output per sample. One job per (cohort, encoder, group of
# `features.group_size` samples) loads the encoder once and extracts every sample of its group
# (TRIDENT-style); the outputs are flagged update(): a rerun (a new sample, a changed input, a
# failure) keeps the finished stores and the job skips those that are current (same encoder, weights,
# geometry, tokens, written after their input store). Rules are generated per (cohort, encoder, group),
# named features_<cohort>_<encoder>_<k>, for the encoders the cohort can run (no weights needed, or weights
# configured); a profile's `set-resources: features:` applies to all of them.
#
# The outputs are concrete paths (no wildcard): Snakemake's output index then finds the one producer of a
# store by its exact path, so building the DAG stays linear in the number of samples. (A `{group}` wildcard
# rule cannot declare per-sample outputs, and per-sample jobs would load the encoder once per sample.)
#
# Image encoders read the sample's image store (images.zarr); expression encoders (Geneformer) its
# token store's tile_counts. Weights come from `encoders: {name: {weights: path}}`; the weights file
# (or HF directory) is an input, so changing it reruns the job. Encoders without configured weights
# run only if the registry allows random init (vit_s).


include: "features_functions.smk"


for _cohort in COHORTS:
    for _enc in runnable_encoders(_cohort):
        for _k, _group in enumerate(feature_groups(_cohort)):
            _name = re.sub(r"\W", "_", f"features_{_cohort}_{_enc}_{_k}")

            rule:
                name:
                    _name
                input:
                    unpack(features_group_inputs(_cohort, _enc, _group)),
                output:
                    stores=[update(directory(P.features(_cohort, _enc, s))) for s in _group],
                params:
                    samples=list(_group),
                    encoder_name=_enc,
                    encoder=lambda w, c=_cohort, e=_enc: to_plain(cfg_of(c).encoder(e)),
                    features=lambda w, c=_cohort: to_plain(cfg_of(c).features),
                    vit=lambda w, c=_cohort: to_plain(cfg_of(c).model.vit),
                log:
                    P.log("features", _enc, f"group{_k}", cohort=_cohort),
                threads: 4
                resources:
                    gpu=1,
                    mem_mb=lambda w, attempt, c=_cohort: int(cfg_of(c).resources.gpu_mem_mb) * attempt,
                    runtime=runtime_min(30, 0.005, "stores"),
                conda:
                    "../../envs/morphomol.yaml"
                script:
                    "../../scripts/features.py"

            apply_profile_resources(_name, "features")
