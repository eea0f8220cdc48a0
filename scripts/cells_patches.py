# Adapter of rule `cells_patches` (workflow/rules/cells.smk): one typed call.
from morphomol.config import typed
from morphomol.smk import run
from morphomol.studies.cells.config import CellsConfig
from morphomol.studies.cells.ingest import write_cell_patches

run(lambda smk: write_cell_patches(
    units=smk.input.units,
    he_path=smk.input.he,
    he_mpp=smk.params.he_mpp,
    out_store=smk.output.store,
    cfg=typed(CellsConfig, smk.params.cells),
))
