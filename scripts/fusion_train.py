# Adapter of rules `fusion_train`, `fusion_train_cpu`, `fusion_min_mae`, `fusion_clip`
# (workflow/rules/fusion.smk): one typed call. A job given N GPUs (resources gpu=N, from
# resources.train_gpus) trains data-parallel in N torchrun processes (morphomol.train.ddp).
from pathlib import Path

from morphomol.config import ModelConfig, TrainingConfig, typed
from morphomol.smk import run
from morphomol.studies.fusion.data import FoldInputs
from morphomol.studies.fusion.run import run_setting
from morphomol.studies.fusion.settings import ModelSetting
from morphomol.train.checkpoint import RunOutputs
from morphomol.train.runtime import Runtime


def main(smk):
    out, inp, p = smk.output, smk.input, smk.params
    samples = list(p.samples)

    def per_sample(name):
        return dict(zip(samples, map(Path, inp.get(name)), strict=True)) if name in inp.keys() else {}

    inputs = FoldInputs(
        folds=Path(inp.folds), fold=int(smk.wildcards.fold), panel=Path(inp.panel), tokens=per_sample("tokens"),
        units=per_sample("units"), tiles=per_sample("tiles"),
        features={enc: per_sample(f"features_{enc}") for enc in p.cached},
        vit_weights=Path(inp.vit_weights) if "vit_weights" in inp.keys() else None)
    outputs = RunOutputs(
        metrics=Path(out.metrics),
        predictions=Path(out.predictions) if "predictions" in out.keys() else None,
        checkpoint=Path(out.checkpoint) if "checkpoint" in out.keys() else None,
        checkpoint_meta=Path(out.checkpoint_meta) if "checkpoint_meta" in out.keys() else None)
    processes = max(1, int(dict(smk.resources.items()).get("gpu", 1) or 1))
    run_setting(ModelSetting.from_dict(smk.wildcards.setting, p.setting), inputs, outputs,
                fold=int(smk.wildcards.fold), training=typed(TrainingConfig, p.training),
                model=typed(ModelConfig, p.model), weights=p.weights,
                runtime=Runtime(seed=int(p.seed), threads=max(1, int(smk.threads) // processes),
                                num_workers=p.num_workers),
                processes=processes)


run(main)
