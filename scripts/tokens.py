# Snakemake adapter for rule tokens (workflow/rules/tokens.smk): no logic here.
from morphomol import tokens
from morphomol.smk import run


def main(smk):
    tokens.tokens_sample(tiles=smk.input.tiles, tiles_store=smk.input.store, registration=smk.input.registration,
                         xenium_dir=smk.input.xenium, out_tokens=smk.output.tokens, out_counts=smk.output.counts,
                         out_targets=smk.output.targets, panel=dict(smk.params.panel), sample=smk.wildcards.sample,
                         qv_min=smk.params.io.get("qv_min", 20.0),
                         batch_size=int(smk.params.io.get("batch_size", 2_000_000)),
                         chunk_tiles=int(smk.params.tiling.get("chunk_tiles", 64)))


run(main)
