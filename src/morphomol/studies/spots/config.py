"""Typed section 'spots' of the configuration (torch-free; fields mirror workflow/schemas/study.spots.schema.yaml).

Defaults live in the schema only; :func:`morphomol.config.sections.build` fills these frozen
dataclasses from the validated, defaulted mapping. Scripts rebuild the section with
``morphomol.config.typed(SpotsConfig, params.spots)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PatchOptions:
    """One square patch per in-tissue spot, centred on it (``spots.patches``)."""

    size_um: float = 112.0          # patch side in µm (HEST: 224 px at 0.5 µm/px)
    out_px: int = 224               # stored side in px
    on_edge: str = "pad"            # pad | drop: patches partly outside the image
    chunk: int = 64                 # patches per zarr chunk


@dataclass(frozen=True)
class GeometryOptions:
    """Pixel-size check against the spot geometry (``spots.geometry``)."""

    tolerance: float = 0.1          # relative disagreement between independent µm/px sources that stops
    fullres_spot_um: float = 65.0   # µm that Space Ranger's spot_diameter_fullres spans


@dataclass(frozen=True)
class TargetOptions:
    """Gene targets chosen per fold on training samples only (``spots.targets``)."""

    mode: str = "moran"             # moran | hvg | yaml
    n_genes: int = 1000
    genes_file: str | None = None   # YAML list of genes (mode yaml)
    transform: str = "log1p"        # log1p | normalize_log1p (per-spot: for cohorts of mixed sequencing depth)
    target_sum: float = 10000.0
    min_spot_fraction: float = 0.01  # candidate genes are detected in at least this fraction of training spots
    n_eval_genes: int = 50          # HEST: Pearson on the 50 most variable genes
    n_neighbors: int = 6            # spatial neighbours of a spot for Moran's I


@dataclass(frozen=True)
class HeadTraining:
    """The head's optimisation (``spots.training``): Adam, constant lr, early stopping on validation MSE."""

    epochs: int = 50
    batch_size: int = 256
    lr: float = 1.0e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    patience: int = 5
    init_bias_mean: bool = True
    gpu: bool = False
    save_checkpoints: str = "first"  # first | all | none (seeds whose weights are kept)


@dataclass(frozen=True)
class CaptionOptions:
    """Captions per spot and their sentence embeddings (``spots.captions``)."""

    source: str = "none"            # none | csv (sheet column `captions`) | vlm (a local image-text-to-text model)
    vlm_model: str | None = None
    prompt: str = ""
    max_words: int = 25
    max_new_tokens: int = 48
    batch_size: int = 8
    sentence_model: str | None = None
    embed_batch_size: int = 128


@dataclass(frozen=True)
class BaselineOptions:
    """Baselines on the same splits and features (``spots.baselines``)."""

    ridge_hest: bool = True         # standardise -> PCA -> ridge, alpha = 100 / (d * n_genes), no intercept
    ridge_cv: bool = True           # the same with the CV-tuned alpha of the `ridge` section
    mean: bool = True               # per-gene training mean
    depth_only: bool = True         # ridge on log1p(total counts) alone: the sequencing-depth control


@dataclass(frozen=True)
class MapOptions:
    samples: int | None = 2         # samples with spatial maps (null: every sample)


@dataclass(frozen=True)
class SpotsConfig:
    """Options of the spots study (config section `spots`)."""

    settings_file: str = "config/experiments/spots.yaml"
    encoder: str = "uni2h"
    seeds: tuple[int, ...] = (40, 41, 42, 43, 44, 45, 51, 54)
    reference: str = "seed_head"
    missing_spots: str = "drop"     # drop | error: counts spots without a position, selected spots without counts
    patches: PatchOptions = field(default_factory=PatchOptions)
    geometry: GeometryOptions = field(default_factory=GeometryOptions)
    targets: TargetOptions = field(default_factory=TargetOptions)
    training: HeadTraining = field(default_factory=HeadTraining)
    captions: CaptionOptions = field(default_factory=CaptionOptions)
    baselines: BaselineOptions = field(default_factory=BaselineOptions)
    maps: MapOptions = field(default_factory=MapOptions)
