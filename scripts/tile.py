# Adapter of rule `tile` (workflow/rules/tile.smk): one typed call.
from morphomol.config import IOConfig, TilingConfig, typed
from morphomol.smk import run
from morphomol.tiling import tile_sample

run(lambda smk: tile_sample(
    he_path=smk.input.he,
    registration=smk.input.registration,
    xenium_dir=smk.params.xenium_dir,
    out_table=smk.output.tiles,
    out_store=smk.output.store,
    out_qc=smk.output.qc,
    sample=smk.wildcards.sample,
    he_mpp=smk.params.he_mpp,
    cfg=typed(TilingConfig, smk.params.tiling),
    grid=smk.params.grid,
    io=typed(IOConfig, smk.params.io),
))
