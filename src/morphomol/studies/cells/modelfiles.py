"""What a local base-model directory must hold (torch-free: the pre-flight check reads only file names and
``config.json``). Weights must be safetensors: pickled ``*.bin`` checkpoints are never loaded."""

from __future__ import annotations

import json
from pathlib import Path

from morphomol.errors import InputError

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def check_model_dir(path: str | Path, *, field: str = "cells.model.path", file: str | Path | None = None) -> Path:
    """InputError unless ``path`` is a complete local model directory: config.json (with a model_type),
    safetensors weights (every shard of an index), a processor config and a tokenizer."""
    p = Path(path)
    where = f"base model directory {p}"
    if not p.exists():
        raise InputError(f"{where} not found", file=file, field=field,
                         expected="a local directory (models are never downloaded)")
    if not p.is_dir():
        raise InputError(f"{where} is a file", file=file, field=field, expected="a directory")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise InputError(f"{where} has no config.json", file=file, field=field, expected="a transformers model directory")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise InputError(f"cannot read {cfg} ({exc})", file=file, field=field) from None
    if not model_type:
        raise InputError(f"{cfg} names no model_type", file=file, field=field, expected="e.g. gemma3")
    index = p / "model.safetensors.index.json"
    shards = sorted(p.glob("*.safetensors"))
    if index.is_file():
        try:
            needed = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise InputError(f"cannot read {index} ({exc})", file=file, field=field) from None
        missing = [s for s in needed if not (p / s).is_file()]
        if missing:
            raise InputError(f"{where} lacks weight shard(s) {missing[:5]}", file=file, field=field,
                             expected="every shard listed in model.safetensors.index.json")
    elif not shards:
        bins = sorted(x.name for x in p.glob("*.bin"))
        hint = f" (found {bins[:3]}: pickled weights are never loaded; convert them to safetensors)" if bins else ""
        raise InputError(f"{where} has no weights{hint}", file=file, field=field, expected="*.safetensors weights")
    if not any((p / f).is_file() for f in PROCESSOR_FILES):
        raise InputError(f"{where} has no processor", file=file, field=field,
                         expected=" or ".join(PROCESSOR_FILES) + " (AutoProcessor)")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise InputError(f"{where} has no tokenizer", file=file, field=field, expected=" or ".join(TOKENIZER_FILES))
    return p


def model_files(path: str | Path) -> list[Path]:
    """The files of a model directory a job reads (declared as rule inputs)."""
    p = Path(path)
    return sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")) if p.is_dir() else []
