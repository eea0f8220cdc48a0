# Frozen-encoder feature cache, shared by every study: one job per (cohort, encoder, sample) writes
# results/{cohort}/features/{encoder}/{sample}.zarr, rows = the sample's units.
#
# Image encoders read the sample's image store (tiles.zarr); expression encoders (Geneformer) its
# token store's tile_counts. Weights come from `encoders: {name: {weights: path}}`; the weights file
# (or HF directory) is an input, so changing it reruns the job. Encoders without configured weights
# run only if the registry allows random init (vit_s).


def feature_encoders(cohort):
    """Encoders whose cached features are extracted (configured, and with weights when they need them)."""
    from morphomol.encoders.registry import get_spec

    c = cfg_of(cohort)
    return [e for e in c.features.encoders if not (get_spec(e).requires_weights and not c.weights(e))]


def _features_inputs(w):
    from morphomol.encoders.registry import get_spec

    expression = get_spec(w.encoder).kind == "expression"
    inputs = {"store": P.tokens(w.cohort, w.sample) if expression else P.tile_store(w.cohort, w.sample)}
    weights = cfg_of(w).weights(w.encoder)
    if weights:
        inputs["weights"] = weights
    return inputs


rule features:
    input:
        unpack(_features_inputs),
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
