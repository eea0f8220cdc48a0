"""Typed section 'cells' of the configuration (torch-free; fields mirror workflow/schemas/study.cells.schema.yaml)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CellsConfig:
    """Options of the cells study (config section `cells`)."""
