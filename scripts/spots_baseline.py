# Adapter of rule `spots_baseline` (workflow/rules/spots.smk): one typed call.
from pathlib import Path

from morphomol.config import RidgeConfig, typed
from morphomol.smk import run
from morphomol.studies.spots.baselines import run_spot_baseline
from morphomol.studies.spots.train import SpotsInputs


def main(smk):
    inp, p = smk.input, smk.params
    inputs = SpotsInputs(
        units=dict(zip(p.samples, map(Path, inp.units), strict=True)),
        features=dict(zip(p.samples, map(Path, inp.features), strict=True)) if "features" in inp.keys() else {},
        folds=Path(inp.folds), targets=[Path(x) for x in inp.targets])
    return run_spot_baseline(smk.wildcards.baseline, inputs, out_metrics=smk.output.metrics,
                             out_predictions=smk.output.predictions, ridge=typed(RidgeConfig, p.ridge),
                             encoder=p.encoder, seed=int(p.seed))


run(main)
