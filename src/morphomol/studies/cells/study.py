"""The cells study's registry entry and pre-flight checks (torch-free)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from morphomol.studies import StudySpec, register_study


def check(cohort: Any, *, workdir: Path, config_file: Path) -> None:
    """Everything checkable before any job runs."""


STUDY = register_study(StudySpec(
    name="cells",
    description="QLoRA-tuned multimodal LLM for cell types from expression and H&E (seed 000)",
    cohort_kinds=("cells",),
    check=check,
))
