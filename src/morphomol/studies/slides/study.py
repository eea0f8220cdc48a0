"""The slides study's registry entry and pre-flight checks (torch-free)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from morphomol.studies import StudySpec, register_study


def check(cohort: Any, *, workdir: Path, config_file: Path) -> None:
    """Everything checkable before any job runs."""


STUDY = register_study(StudySpec(
    name="slides",
    description="slide-level contrastive alignment of frozen H&E and RNA encoders (seed 003)",
    cohort_kinds=("slides",),
    check=check,
))
