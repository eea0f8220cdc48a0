# Frozen-encoder feature cache, shared by every study: results/{cohort}/features/{encoder}/{sample}.zarr,
# rows = the sample's units, one output per sample. One job per (cohort, encoder, group of
# `features.group_size` samples) loads the encoder once and extracts every sample of its group
# (TRIDENT-style); the outputs are flagged update(): a rerun (a new sample, a changed input, a
# failure) keeps the finished stores and the job skips those that are current (same encoder, weights,
# geometry, tokens, written after their input store). Rules are generated per (cohort, group), named
# features_<cohort>_<k>; a profile's `set-resources: features:` applies to all of them.
#
# Image encoders read the sample's image store (images.zarr); expression encoders (Geneformer) its
# token store's tile_counts. Weights come from `encoders: {name: {weights: path}}`; the weights file
# (or HF directory) is an input, so changing it reruns the job. Encoders without configured weights
# run only if the registry allows random init (vit_s).


include: "features_functions.smk"


for _cohort in COHORTS:
    for _k, _group in enumerate(feature_groups(_cohort)):
        _res = {"gpu": 1, "mem_mb": int(cfg_of(_cohort).resources.gpu_mem_mb), "runtime": 120}
        _name = re.sub(r"\W", "_", f"features_{_cohort}_{_k}")

        rule:
            name:
                _name
            input:
                unpack(features_group_inputs(_cohort, _group)),
            output:
                stores=[update(directory(P.features(_cohort, "{encoder}", s))) for s in _group],
            params:
                samples=list(_group),
                encoder=lambda w, c=_cohort: to_plain(cfg_of(c).encoder(w.encoder)),
                features=lambda w, c=_cohort: to_plain(cfg_of(c).features),
                vit=lambda w, c=_cohort: to_plain(cfg_of(c).model.vit),
            log:
                P.log("features", "{encoder}", f"group{_k}", cohort=_cohort),
            threads: 4
            resources:
                **_res,
            conda:
                "../../envs/morphomol.yaml"
            script:
                "../../scripts/features.py"

        apply_profile_resources(_name, "features")
