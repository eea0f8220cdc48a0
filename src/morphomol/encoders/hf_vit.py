"""transformers vision backbones: ``phikon`` (ViTModel) and ``phikon2`` (Dinov2Model).

* ``phikon``  Phikon: transformers ``ViTModel`` ViT-B/16 (``add_pooling_layer=False``) from a local
  HF dir; ImageNet mean/std; CLS of ``last_hidden_state`` (768-d).
* ``phikon2`` Phikon-v2: transformers ``Dinov2Model`` ViT-L/16 from a local HF dir; CLS (1024-d).
  Table A.3 of the paper lists "phikon" with 303M parameters and a 1024-d embedding, i.e. this
  model; ``phikon`` (ViT-B, 86M, 768-d) is the original Phikon.

transformers >= 5 renamed module parameters; HF checkpoints (either layout) are loaded through
transformers' own ``from_pretrained(None, config=..., state_dict=...)`` conversion, with every
missing/unexpected/mismatched key turned into an InputError. A weights directory brings its own
``config.json``; a single weights file takes the geometry from the spec defaults + overrides.
Torch-free at import.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from morphomol.encoders.registry import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, register_encoder

#: transformers model class -> (its config class, fixed constructor kwargs)
MODEL_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "ViTModel": ("ViTConfig", {"add_pooling_layer": False}),
    "Dinov2Model": ("Dinov2Config", {}),
}
HF_VIT_POOLINGS = ("cls", "mean", "cls+mean")
HF_VIT_SELECT = ("vit.", "dinov2.")
HF_VIT_IGNORE = ("pooler.", "classifier.")


@register_encoder(
    name="phikon", kind="image", architecture="transformers ViTModel ViT-B/16 (Phikon)", model_name="ViTModel",
    input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, embed_dim=768, pooling="cls", poolings=HF_VIT_POOLINGS,
    requires_weights=True, select_prefix=HF_VIT_SELECT, ignore_prefixes=HF_VIT_IGNORE,
    defaults={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
              "intermediate_size": 3072, "image_size": 224, "patch_size": 16, "qkv_bias": True},
    description="Phikon ViT-B/16 (iBOT)",
)
@register_encoder(
    name="phikon2", kind="image", architecture="transformers Dinov2Model ViT-L/16 (Phikon-v2)",
    model_name="Dinov2Model", input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, embed_dim=1024,
    pooling="cls", poolings=HF_VIT_POOLINGS, requires_weights=True, select_prefix=HF_VIT_SELECT,
    ignore_prefixes=HF_VIT_IGNORE,
    defaults={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
              "mlp_ratio": 4, "image_size": 224, "patch_size": 16, "layerscale_value": 1e-5},
    description="Phikon-v2 ViT-L/16 (DINOv2); Table A.3's 303M-parameter, 1024-d 'phikon'",
)
def build_hf_vit(spec: EncoderSpec, weights: Path | None, overrides: Mapping[str, Any], seed: int, *,
                 overrides_field: str | None = None) -> Any:
    """transformers ``spec.model_name`` from a local HF dir or a weights file, or seeded random."""
    from morphomol.encoders.base import hf_offline

    hf_offline()
    import transformers

    from morphomol.encoders._modules import HFViTEncoder
    from morphomol.encoders.base import hf_from_state_dict, jsonable, read_hf_config, split_overrides
    from morphomol.encoders.weights import read_encoder_state_dict, weights_id

    config_name, kwargs = MODEL_CLASSES[spec.model_name]
    config_cls = getattr(transformers, config_name)
    model_cls = getattr(transformers, spec.model_name)
    arch, enc = split_overrides(spec, overrides)
    if weights is not None and weights.is_dir():
        config = read_hf_config(weights, config_cls, spec.name)
    else:
        config = config_cls(**arch)
    sd = read_encoder_state_dict(weights, spec) if weights is not None else None
    model = hf_from_state_dict(model_cls, config, sd, source=weights, encoder=spec.name, seed=seed, **kwargs)
    return HFViTEncoder(spec, model, config={**enc, "arch": jsonable(config.to_diff_dict())},
                        weights_id=weights_id(weights, seed))
