"""Typed section 'cells' of the configuration (torch-free; fields mirror workflow/schemas/study.cells.schema.yaml).

The schema is the single source of keys, types and defaults; these frozen dataclasses are built from the
validated, defaulted mapping (``morphomol.config.typed(CellsConfig, mapping)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: the five tasks of the seed: gene -> cell type, cell type -> genes, image -> genes, image -> cell type,
#: image + genes -> cell type
TASKS: tuple[str, ...] = ("gene_to_type", "type_to_genes", "image_to_genes", "image_to_type", "image_genes_to_type")
IMAGE_TASKS: tuple[str, ...] = ("image_to_genes", "image_to_type", "image_genes_to_type")
#: tasks whose response is a cell type (evaluated as classification)
TYPE_TASKS: tuple[str, ...] = ("gene_to_type", "image_to_type", "image_genes_to_type")
#: modality of each classification task (the modality matrix)
MODALITY: dict[str, str] = {"gene_to_type": "genes", "image_to_type": "image", "image_genes_to_type": "image+genes"}


@dataclass(frozen=True)
class TinyModelConfig:
    """Geometry of the tiny random Gemma-3 built locally for the demo and tests."""

    hidden_size: int = 64
    layers: int = 2
    heads: int = 2
    kv_heads: int = 1
    head_dim: int = 32
    intermediate_size: int = 128
    vision_hidden_size: int = 32
    vision_layers: int = 1
    vision_heads: int = 2
    vision_intermediate_size: int | None = None
    image_size: int = 32
    patch_size: int = 8
    mm_tokens: int = 4
    seed: int = 0


@dataclass(frozen=True)
class BaseModelConfig:
    path: str | None = None
    tiny: TinyModelConfig | None = None
    attn_implementation: str = "eager"
    dtype: str = "bfloat16"


@dataclass(frozen=True)
class QLoRAConfig:
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: str = "all-linear"
    modules_to_save: tuple[str, ...] = ("lm_head", "embed_tokens")


@dataclass(frozen=True)
class CellsTrainConfig:
    steps: int = 2000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    loss_average: str = "example"
    weight_decay: float = 0.0
    gradient_checkpointing: bool = True
    gpus: int = 1
    max_length: int = 1024
    log_every: int = 10
    val_every: int = 200
    val_examples: int = 64
    save_every: int = 100


@dataclass(frozen=True)
class CellsEvalConfig:
    modes: tuple[str, ...] = ("generate", "score")
    batch_size: int = 16
    max_new_tokens: int = 16
    max_cells: int | None = None
    untuned: bool = True


@dataclass(frozen=True)
class CellsBaselinesConfig:
    """Baselines; hyper-parameters chosen per fold by inner donor-grouped CV over the grids, the single
    values (``knn_k``, ``lr_c``, standardised) when a fold has fewer than two fit donors."""

    knn_k: int = 15
    knn_pcs: int = 50
    lr_c: float = 1.0
    lr_max_iter: int = 2000
    max_reference: int = 50000
    knn_k_grid: tuple[int, ...] = (5, 15, 30)
    lr_c_grid: tuple[float, ...] = (0.1, 1.0, 10.0)
    lr_standardise: tuple[bool, ...] = (True, False)
    inner_folds: int = 3


@dataclass(frozen=True)
class CellsConfig:
    """Options of the cells study (config section `cells`)."""

    label_key: str = "cell_type"
    label_map: str | None = None
    values: str = "counts"
    layer: str | None = None
    donor_key: str | None = None
    organism: str = "Homo sapiens"
    n_hvg: int = 2000
    hvg_flavor: str = "auto"
    n_genes: int = 100
    patch_um: float = 32.0
    patch_px: int = 224
    on_edge: str = "pad"
    templates: str = "config/experiments/cells.yaml"
    tasks: dict[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)
    model: BaseModelConfig = field(default_factory=BaseModelConfig)
    quantization: str = "auto"
    qlora: QLoRAConfig = field(default_factory=QLoRAConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: CellsTrainConfig = field(default_factory=CellsTrainConfig)
    eval: CellsEvalConfig = field(default_factory=CellsEvalConfig)
    baselines: CellsBaselinesConfig = field(default_factory=CellsBaselinesConfig)

    @property
    def image_tasks(self) -> list[str]:
        """Enabled tasks that read an H&E patch."""
        return [t for t in self.tasks if t in IMAGE_TASKS]
