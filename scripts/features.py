# Adapter of the features rules (workflow/rules/features.smk): one typed call per job, one encoder
# over a group of samples (one output store per sample).
from morphomol.config import EncoderConfig, FeaturesConfig, ViTConfig, typed
from morphomol.features import extract_features_group
from morphomol.smk import run

run(lambda smk: extract_features_group(
    smk.params.encoder_name,
    samples=list(smk.params.samples),
    stores=list(smk.input.stores),
    outs=list(smk.output.stores),
    encoder=typed(EncoderConfig, smk.params.encoder),
    features=typed(FeaturesConfig, smk.params.features),
    vit=typed(ViTConfig, smk.params.vit),
))
