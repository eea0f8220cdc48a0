"""Configuration: strict schemas, typed sections, cohorts and their sample sheets.

    from morphomol.config import load_config, default_sections
    pc = load_config("config/config.yaml")        # PipelineConfig
    cohort = pc.cohorts["demo"]                    # Cohort: .cfg (Sections), .samples, .panel, .studies
    cohort.cfg.tiling.tile_px                      # typed, frozen

Torch-free: imported when Snakemake builds the DAG.
"""

from morphomol.config.cohorts import (
    Cohort,
    Panel,
    PipelineConfig,
    default_sections,
    load_config,
    read_panel,
    read_sample_sheet,
)
from morphomol.config.kinds import CohortKind, get_kind, kinds, register_kind
from morphomol.config.schema import SCHEMA_DIR, deep_merge, read_yaml, validate
from morphomol.config.sections import (
    SECTIONS,
    EncoderConfig,
    ExperimentsConfig,
    FeaturesConfig,
    IOConfig,
    ModelConfig,
    PanelsConfig,
    RegistrationConfig,
    ResourcesConfig,
    RidgeConfig,
    Sections,
    SplitsConfig,
    TablesConfig,
    TilingConfig,
    TokensConfig,
    TrainingConfig,
    ViTConfig,
    build_sections,
    to_plain,
)
from morphomol.config.sections import build as typed

__all__ = [
    "Cohort", "CohortKind", "EncoderConfig", "ExperimentsConfig", "FeaturesConfig", "IOConfig", "ModelConfig",
    "Panel", "PanelsConfig", "PipelineConfig", "RegistrationConfig", "ResourcesConfig", "RidgeConfig", "SCHEMA_DIR",
    "SECTIONS", "Sections", "SplitsConfig", "TablesConfig", "TilingConfig", "TokensConfig", "TrainingConfig",
    "ViTConfig", "build_sections", "deep_merge", "default_sections", "get_kind", "kinds", "load_config", "read_panel",
    "read_sample_sheet", "read_yaml", "register_kind", "to_plain", "typed", "validate",
]
