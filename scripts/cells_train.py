# Adapter of rule `cells_train` (workflow/rules/cells.smk): one typed call (torchrun when cells.train.gpus > 1).
from pathlib import Path

from morphomol.config import typed
from morphomol.smk import run
from morphomol.studies.cells.config import CellsConfig
from morphomol.studies.cells.launch import train_job
from morphomol.studies.cells.trainer import TrainInputs, TrainOutputs

run(lambda smk: train_job(
    TrainInputs(fold_table=Path(smk.input.fold_table), fold_meta=Path(smk.input.fold_meta),
                base_model=Path(smk.params.base_model), templates=Path(smk.input.templates),
                image_stores={s: Path(p) for s, p in smk.params.image_stores.items()}),
    TrainOutputs(adapter=Path(smk.output.adapter), metrics=Path(smk.output.metrics), log_csv=Path(smk.output.log_csv)),
    cfg=typed(CellsConfig, smk.params.cells),
    seed=int(smk.params.seed),
    threads=int(smk.threads),
))
