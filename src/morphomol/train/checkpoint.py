"""What a run writes: metrics.json, predictions, and the best model (safetensors + JSON metadata)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from morphomol.util.atomic import atomic_path
from morphomol.util.jsonio import write_json


@dataclass
class RunOutputs:
    """Where one run writes (Snakemake passes explicit paths; ``in_dir`` for tests and notebooks)."""

    metrics: Path
    predictions: Path | None = None
    checkpoint: Path | None = None
    checkpoint_meta: Path | None = None

    @classmethod
    def in_dir(cls, out_dir: str | Path) -> RunOutputs:
        d = Path(out_dir)
        return cls(d / "metrics.json", d / "predictions.parquet", d / "checkpoint.safetensors", d / "checkpoint.json")

    @property
    def work_dir(self) -> Path:
        """The run directory (``resume.pt`` lives here)."""
        return self.metrics.parent


def as_outputs(out: str | Path | RunOutputs) -> RunOutputs:
    return out if isinstance(out, RunOutputs) else RunOutputs.in_dir(out)


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(model: torch.nn.Module, path: str | Path, meta_path: str | Path, meta: dict[str, Any]) -> None:
    """The model's weights as safetensors (atomic) and its metadata as JSON."""
    from safetensors.torch import save_file

    state = cpu_state(model)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"setting": str(meta.get("setting", "")), "format": "morphomol"})
    write_json(meta_path, meta)
