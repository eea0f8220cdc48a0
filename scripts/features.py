# Adapter of rule `features` (workflow/rules/features.smk): one typed call.
from morphomol.config import EncoderConfig, FeaturesConfig, ViTConfig, typed
from morphomol.features import extract_features_for
from morphomol.smk import run

run(lambda smk: extract_features_for(
    smk.wildcards.encoder,
    store=smk.input.store,
    out=smk.output.store,
    encoder=typed(EncoderConfig, smk.params.encoder),
    features=typed(FeaturesConfig, smk.params.features),
    vit=typed(ViTConfig, smk.params.vit),
))
