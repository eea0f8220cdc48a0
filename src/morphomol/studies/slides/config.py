"""Typed section 'slides' of the configuration (torch-free; fields mirror workflow/schemas/study.slides.schema.yaml)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SlidesConfig:
    """Options of the slides study (config section `slides`)."""
