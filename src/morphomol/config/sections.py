"""Typed configuration: one frozen dataclass per section of ``config/config.yaml``.

Built once from the schema-validated, schema-defaulted dict (:func:`build_sections`): the JSON
schemas in ``workflow/schemas/`` are the single source of keys, types and defaults, the
dataclasses give the library typed, immutable access (``cfg.tiling.tile_px``). Every section of
the schema is strict (``additionalProperties: false``), so a misspelled key never gets here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from morphomol.studies.cells.config import CellsConfig
from morphomol.studies.slides.config import SlidesConfig
from morphomol.studies.spots.config import SpotsConfig


@dataclass(frozen=True)
class IOConfig:
    qv_min: float | None
    batch_size: int


@dataclass(frozen=True)
class RegistrationConfig:
    robust: str
    outlier_threshold_um: float
    max_rms_um: float
    region_assignment: str
    refine: str
    refine_mpp: float
    mpp_tolerance: float


@dataclass(frozen=True)
class TilingConfig:
    tile_px: int
    stride_px: int
    tile_mpp: float
    out_px: int
    min_transcripts: int
    min_tissue_fraction: float
    thumbnail_mpp: float
    chunk_tiles: int


@dataclass(frozen=True)
class TokensConfig:
    grid: int


@dataclass(frozen=True)
class PanelsConfig:
    mode: str
    n_hvg_targets: int


@dataclass(frozen=True)
class SplitsConfig:
    """``splits``: patient-grouped outer folds and the validation policy (see :mod:`morphomol.splits`)."""

    n_folds: int
    val_fraction: float
    validation: str = "auto"  # auto | patient | sample | none


@dataclass(frozen=True)
class EncoderConfig:
    """``encoders.<name>``: local weights and options of one registry encoder."""

    weights: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    pooling: str | None = None
    batch_size: int | None = None
    patch_tokens: bool | None = None


@dataclass(frozen=True)
class FeaturesConfig:
    batch_size: int
    encoders: tuple[str, ...]
    device: str
    patch_tokens: bool
    read_threads: int = 2       # decode threads of the extraction's reader
    group_size: int = 1         # samples per features job (one model load per job; finished samples skipped)


@dataclass(frozen=True)
class RidgeConfig:
    n_components: int
    inner_folds: int
    select_by: str
    alphas: tuple[float, ...] | None


@dataclass(frozen=True)
class ViTConfig:
    embed_dim: int
    depth: int
    num_heads: int
    img_size: int | None = None
    patch_size: int | None = None
    mlp_ratio: float | None = None
    drop_path_rate: float | None = None

    def timm_kwargs(self) -> dict[str, Any]:
        """The geometry as ``timm.create_model`` keyword arguments (unset options left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class ModelConfig:
    vit: ViTConfig
    expr_hidden: int
    clip_proj_dim: int


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int
    warmup_epochs: int
    batch_size: int
    lr_head: float
    lr_backbone: float
    min_lr: float
    weight_decay: float
    grad_clip: float
    patience: int
    num_workers: int
    clip_batch_size: int | None  # None in the config of runs that do not use it (non-CLIP training jobs)
    buffer_chunks: int
    compile: bool
    # issue 19 (defaults here = the behaviour before them; the schema's defaults apply to config runs)
    loader: str = "auto"              # auto | feed | workers (morphomol.train.runtime.loader_threads)
    loader_threads: int | None = None  # decode threads of the feed (None: num_workers)
    buffer_batches: int = 0           # the shuffle buffer holds at least this many batches
    validate_every: int = 1           # validate (and select / stop early) every k epochs and after the last
    checkpoint_every: int = 1         # write resume.pt every k epochs (always on SIGTERM), in the background


@dataclass(frozen=True)
class ExperimentsConfig:
    settings_file: str


@dataclass(frozen=True)
class TablesConfig:
    baseline: str
    plot_gene: str | None
    alpha: float
    ridge: bool
    spatial_samples: int | tuple[str, ...] | None
    thumbnail_max_size: int


@dataclass(frozen=True)
class ResourcesConfig:
    cpu_mem_mb: int
    gpu_mem_mb: int
    train_runtime_min: int
    train_threads: int
    train_gpus: int = 1  # GPUs (DDP processes through torchrun) per GPU training job


@dataclass(frozen=True)
class Sections:
    """Every configuration section, after a cohort's overrides were applied."""

    seed: int
    io: IOConfig
    registration: RegistrationConfig
    tiling: TilingConfig
    tokens: TokensConfig
    panels: PanelsConfig
    splits: SplitsConfig
    encoders: dict[str, EncoderConfig]
    features: FeaturesConfig
    ridge: RidgeConfig
    model: ModelConfig
    training: TrainingConfig
    experiments: ExperimentsConfig
    tables: TablesConfig
    spots: SpotsConfig
    cells: CellsConfig
    slides: SlidesConfig
    resources: ResourcesConfig

    def encoder(self, name: str) -> EncoderConfig:
        """``encoders.<name>`` (an empty entry when the config names none)."""
        return self.encoders.get(name) or EncoderConfig()

    def weights(self, name: str) -> str | None:
        return self.encoder(name).weights

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


#: Top-level sections a cohort YAML may override (every field of :class:`Sections`).
SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Sections))


# ------------------------------------------------------------------------------ building
def _convert(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value)
        return tuple(value) if isinstance(value, list) else value
    if dataclasses.is_dataclass(tp):
        return build(tp, value or {})
    if origin is tuple:
        return tuple(_convert(args[0], v) for v in value)
    if origin is dict:
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(vt, v) for k, v in (value or {}).items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def build(cls: type, data: dict[str, Any]) -> Any:
    """Instance of dataclass ``cls`` from a (validated) mapping; nested dataclasses recursively."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name])
    return cls(**kwargs)


def build_sections(config: dict[str, Any]) -> Sections:
    """:class:`Sections` of a schema-validated (and defaulted) config mapping."""
    return build(Sections, config)


def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists (for JSON metadata)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj
