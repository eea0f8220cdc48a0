"""The spots study's registry entry and pre-flight checks (torch-free)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from morphomol.studies import StudySpec, register_study


def check(cohort: Any, *, workdir: Path, config_file: Path) -> None:
    """Everything checkable before any job runs."""


STUDY = register_study(StudySpec(
    name="spots",
    description="frozen pathology FM + 2-layer head on Visium / legacy-ST / HEST spots (seed 001)",
    cohort_kinds=("visium",),
    check=check,
))
