# Adapter of rule `spots_captions` (workflow/rules/spots.smk): one typed call.
from morphomol.config import typed
from morphomol.smk import run
from morphomol.studies.spots.captions import generate_captions
from morphomol.studies.spots.config import SpotsConfig


def main(smk):
    c = typed(SpotsConfig, smk.params.spots).captions
    return generate_captions(store=smk.input.store, units=smk.input.units, model_dir=smk.input.model, prompt=c.prompt,
                             max_words=c.max_words, max_new_tokens=c.max_new_tokens, batch_size=c.batch_size,
                             out=smk.output[0], device=smk.params.device)


run(main)
