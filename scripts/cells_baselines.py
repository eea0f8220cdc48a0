# Adapter of rule `cells_baselines` (workflow/rules/cells.smk): one typed call.
from morphomol.config import typed
from morphomol.smk import run
from morphomol.studies.cells.baselines import run_baselines
from morphomol.studies.cells.config import CellsConfig


def main(smk):
    cfg = typed(CellsConfig, smk.params.cells)
    run_baselines(fold_table=smk.input.fold_table, fold_meta=smk.input.fold_meta,
                  units=dict(zip(smk.params.samples, smk.input.units, strict=True)),
                  image_stores=smk.params.image_stores, out_predictions=smk.output.predictions,
                  out_metrics=smk.output.metrics, cfg=cfg.baselines, max_cells=cfg.eval.max_cells,
                  seed=int(smk.params.seed))


run(main)
