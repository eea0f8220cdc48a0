# Adapter of rule `spots_train` (workflow/rules/spots.smk): one typed call.
from pathlib import Path

from morphomol.config import typed
from morphomol.smk import run
from morphomol.studies.spots.config import SpotsConfig
from morphomol.studies.spots.settings import as_setting
from morphomol.studies.spots.train import SpotsInputs, run_spot_setting


def main(smk):
    inp, p = smk.input, smk.params
    cfg = typed(SpotsConfig, p.spots)
    inputs = SpotsInputs(
        units=dict(zip(p.samples, map(Path, inp.units), strict=True)),
        features=dict(zip(p.samples, map(Path, inp.features), strict=True)),
        folds=Path(inp.folds), targets=[Path(x) for x in inp.targets],
        text=(Path(inp.text_table), Path(inp.text_store)) if "text_table" in inp.keys() else None)
    return run_spot_setting(as_setting(p.setting, smk.wildcards.setting), inputs, out_metrics=smk.output.metrics,
                            out_predictions=smk.output.predictions, training=cfg.training, seeds=cfg.seeds,
                            encoder=p.encoder, threads=int(smk.threads), device=p.device)


run(main)
