# Adapter of rule `cells_fold` (workflow/rules/cells.smk): one typed call.
from morphomol.config import typed
from morphomol.smk import run
from morphomol.studies.cells.config import CellsConfig
from morphomol.studies.cells.folds import write_fold

run(lambda smk: write_fold(
    units=list(smk.input.units),
    folds=smk.input.folds,
    fold=int(smk.wildcards.fold),
    out_table=smk.output.table,
    out_meta=smk.output.meta,
    cfg=typed(CellsConfig, smk.params.cells),
))
