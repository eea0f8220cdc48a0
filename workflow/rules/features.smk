# Frozen-encoder feature cache, shared by every study: one job per (cohort, encoder, sample) writes
# results/{cohort}/features/{encoder}/{sample}.zarr, rows = the sample's units.
#
# Image encoders read the sample's image store (images.zarr); expression encoders (Geneformer) its
# token store's tile_counts. Weights come from `encoders: {name: {weights: path}}`; the weights file
# (or HF directory) is an input, so changing it reruns the job. Encoders without configured weights
# run only if the registry allows random init (vit_s).


rule features:
    input:
        unpack(features_inputs),
    output:
        store=directory(P.features()),
    params:
        encoder=lambda w: to_plain(cfg_of(w).encoder(w.encoder)),
        features=section("features"),
        vit=lambda w: to_plain(cfg_of(w).model.vit),
    log:
        P.log("features", "{encoder}", "{sample}"),
    threads: 4
    resources:
        gpu=1,
        mem_mb=resource("gpu_mem_mb"),
        runtime=120,
    conda:
        "../../envs/morphomol.yaml"
    script:
        "../../scripts/features.py"
