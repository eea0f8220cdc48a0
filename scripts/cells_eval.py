# Adapter of rule `cells_eval` (workflow/rules/cells.smk): one typed call (tuned: llm, or untuned base model).
from pathlib import Path

from morphomol.config import typed
from morphomol.smk import run
from morphomol.studies.cells.config import CellsConfig
from morphomol.studies.cells.evaluate import EvalInputs, evaluate_fold
from morphomol.train.runtime import Runtime

run(lambda smk: evaluate_fold(
    EvalInputs(fold_table=Path(smk.input.fold_table), fold_meta=Path(smk.input.fold_meta),
               base_model=Path(smk.params.base_model), templates=Path(smk.input.templates),
               label_map=Path(smk.input.label_map),
               adapter=Path(smk.input.adapter) if "adapter" in smk.input.keys() else None,
               image_stores={s: Path(p) for s, p in smk.params.image_stores.items()}),
    smk.output.predictions,
    smk.output.metrics,
    cfg=typed(CellsConfig, smk.params.cells),
    runtime=Runtime(seed=int(smk.params.seed), threads=int(smk.threads)),
    model_name=smk.wildcards.setting,
))
