"""Typed section 'slides' of the configuration (torch-free; fields mirror workflow/schemas/study.slides.schema.yaml).

The schema holds the defaults; these frozen dataclasses are built from the validated, defaulted
mapping (``morphomol.config.typed(SlidesConfig, section)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RnaConfig:
    """``slides.rna``: where the bulk RNA of the slides comes from and what its numbers are."""

    path: str | None = None
    value_type: str = "counts"          # counts | tpm | log
    orientation: str = "auto"           # auto | genes_x_samples | samples_x_genes
    pseudobulk_from: str | None = None  # a spatial cohort whose unit tables are summed per sample
    min_fraction_expressed: float = 0.0


@dataclass(frozen=True)
class GeneSetsConfig:
    """``slides.gene_sets``: GMT files, size limits, null sets, ssGSEA weight."""

    gmt: tuple[str, ...] = ()
    min_genes: int = 10
    max_genes: int = 500
    n_null: int = 10
    weight: float = 0.25
    grounded: tuple[str, ...] = ()
    chunk_samples: int = 256


@dataclass(frozen=True)
class SlideTilingConfig:
    """``slides.tiling``: whole-slide tiling (default 256 px at 0.5 µm/px)."""

    tile_px: int = 256
    tile_mpp: float = 0.5
    out_px: int = 224
    min_tissue_fraction: float = 0.5
    thumbnail_mpp: float = 8.0
    max_tiles: int = 0
    chunk_tiles: int = 64
    group_size: int = 16


@dataclass(frozen=True)
class AlignConfig:
    """``slides.align``: projection heads and their contrastive training."""

    proj_dim: int = 128
    hidden: int = 256
    dropout: float = 0.1
    temperature: float = 0.1
    epochs: int = 100
    warmup_epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 1e-4
    patience: int = 15
    grad_clip: float = 1.0


@dataclass(frozen=True)
class PromptingConfig:
    """``slides.prompting``: the soft-kNN and direct-prompting routes."""

    knn_k: int = 10
    knn_temperature: float | None = None
    raise_sd: float = 2.0


@dataclass(frozen=True)
class TransferConfig:
    """``slides.transfer``: leave-one-cohort-out transfer and few-shot adaptation."""

    enabled: bool = True
    fractions: tuple[float, ...] = (0.01, 0.05, 0.1)
    repeats: int = 3
    finetune_epochs: int = 30
    finetune_lr: float = 3e-4


@dataclass(frozen=True)
class SlidesConfig:
    """Options of the slides study (config section `slides`)."""

    rna: RnaConfig = field(default_factory=RnaConfig)
    gene_sets: GeneSetsConfig = field(default_factory=GeneSetsConfig)
    tiling: SlideTilingConfig = field(default_factory=SlideTilingConfig)
    encoder: str = "vit_s"
    poolings: tuple[str, ...] = ("mean", "abmil")
    slide_encoder_weights: dict[str, str] = field(default_factory=dict)
    abmil_max_tiles: int = 512
    slide_pca_components: int = 0
    rna_encoder: str = "pca"
    pca_components: int = 64
    pca_genes: int = 2000
    pca_min_mean: float = 1.0
    align: AlignConfig = field(default_factory=AlignConfig)
    prompting: PromptingConfig = field(default_factory=PromptingConfig)
    retrieval_ks: tuple[int, ...] = (1, 5, 10)
    transfer: TransferConfig = field(default_factory=TransferConfig)

    @property
    def primary(self) -> str:
        """The setting (slide embedding) used for transfer and the predicted-scores AnnData: the first pooling."""
        return self.poolings[0]
