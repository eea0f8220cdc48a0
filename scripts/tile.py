# Snakemake adapter for rule tile (workflow/rules/tile.smk): no logic here.
from morphomol import tiling
from morphomol.smk import run


def main(smk):
    cfg = dict(smk.params.cfg)
    tiling.tile_sample(he_path=smk.input.he, registration=smk.input.registration, xenium_dir=smk.input.xenium,
                       out_table=smk.output.tiles, out_store=smk.output.store, out_qc=smk.output.qc,
                       sample=smk.wildcards.sample, he_mpp=smk.params.he_mpp, grid=smk.params.grid,
                       qv_min=smk.params.io.get("qv_min", 20.0),
                       batch_size=int(smk.params.io.get("batch_size", 2_000_000)), **cfg)


run(main)
