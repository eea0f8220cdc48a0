"""The one call behind the fusion study's train rules (``train``, ``train_cpu``, ``min_mae``, ``clip``):
one setting on one fold, every input an explicit declared path.

``processes > 1`` (the GPUs a GPU rule was given, ``resources.train_gpus``): the same call runs in
that many torchrun processes on this node, data-parallel (:mod:`morphomol.train.ddp`); rank 0
writes the outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from morphomol.config.sections import ModelConfig, TrainingConfig
from morphomol.studies.fusion.data import FoldInputs, fold_from_stores
from morphomol.studies.fusion.settings import ModelSetting
from morphomol.train.checkpoint import RunOutputs
from morphomol.train.runtime import Runtime


def run_setting(setting: ModelSetting, inputs: FoldInputs, outputs: RunOutputs, *, fold: int,
                training: TrainingConfig, model: ModelConfig, weights: Mapping[str, str | None], runtime: Runtime,
                on_step: Callable[[int], None] | None = None, processes: int = 1) -> dict[str, Any]:
    """Train / evaluate ``setting`` on one fold; writes the run's outputs and returns its metrics.

    ``weights``: encoder -> configured local weights path (None: not configured). ``processes``:
    data-parallel processes (> 1: launched through torchrun; Min-MAE always runs in one).
    """
    if processes > 1 and setting.kind != "min_mae":
        from morphomol.train import ddp

        device = "cpu" if runtime.device == "cpu" else "auto"
        return ddp.launch(processes, run_setting, setting, inputs, outputs, fold=fold, training=training,
                          model=model, weights=dict(weights), runtime=runtime, device=device)
    data = fold_from_stores(inputs, buffer_chunks=training.buffer_chunks,
                            buffer_batches=getattr(training, "buffer_batches", 0))
    if setting.kind == "min_mae":
        from morphomol.studies.fusion.baselines import run_min_mae

        return run_min_mae(data, outputs, fold=fold, setting_name=setting.name)
    kw: dict[str, Any] = dict(training=training, model=model, runtime=runtime, weights=dict(weights), fold=fold,
                              inputs=inputs, on_step=on_step)
    if setting.kind == "clip":
        from morphomol.studies.fusion.clip import train_clip

        return train_clip(setting, data, outputs, **kw)
    from morphomol.studies.fusion.regression import train_setting

    return train_setting(setting, data, outputs, **kw)
