# Adapter of rule `cells_base_model` (workflow/rules/cells.smk): one typed call.
from morphomol.config import typed
from morphomol.smk import run
from morphomol.studies.cells.config import CellsConfig
from morphomol.synthetic.cells_model import build_tiny_for_cohort

run(lambda smk: build_tiny_for_cohort(
    out_dir=smk.output.model,
    units=list(smk.input.units),
    label_map=smk.input.label_map,
    templates=smk.input.templates,
    cells=typed(CellsConfig, smk.params.cells),
))
