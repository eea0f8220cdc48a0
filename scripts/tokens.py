# Adapter of rule `tokens` (workflow/rules/tokens.smk): one typed call.
from morphomol.config import IOConfig, typed
from morphomol.smk import run
from morphomol.tokens import tokens_sample

run(lambda smk: tokens_sample(
    tiles=smk.input.tiles,
    tiles_store=smk.input.store,
    registration=smk.input.registration,
    xenium_dir=smk.params.xenium_dir,
    out_tokens=smk.output.tokens,
    out_units=smk.output.units,
    sample=smk.wildcards.sample,
    patient=smk.params.patient_id,
    panel=smk.params.panel,
    io=typed(IOConfig, smk.params.io),
    chunk_tiles=smk.params.chunk_tiles,
    he_path=smk.input.he,
    he_mpp=smk.params.he_mpp,
))
