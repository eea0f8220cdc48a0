"""Typed section 'spots' of the configuration (torch-free; fields mirror workflow/schemas/study.spots.schema.yaml)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpotsConfig:
    """Options of the spots study (config section `spots`)."""
