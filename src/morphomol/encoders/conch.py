"""CONCH v1 image tower (``conch``).

A timm ViT-B/16 trunk (img_size 448, num_classes 0, dynamic_img_size) run to
``forward_features`` + CONCH's ``VisualModel`` head: ``attn_pool_contrast`` (1 query, 8 heads,
d_model 512, context 768, ``ln_q``/``ln_k``), ``ln_contrast`` and ``proj_contrast`` (512x512).
Embedding = ``encode_image(proj_contrast=False, normalize=False)`` (512-d; pooling ``proj``
applies ``proj_contrast``). Keys follow CONCH's ``pytorch_model.bin`` (``visual.trunk.*``,
``visual.attn_pool_contrast.*``...); the captioning pooler (``attn_pool_caption``/``ln_caption``)
and text tower keys are ignored. OpenAI CLIP mean/std; tiles are 224 px, the 448-px position grid
is interpolated by timm's dynamic_img_size (CONCH itself resizes to 448: set override
``input_size: 448`` to match exactly). Torch-free at import.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from morphomol.encoders.registry import CLIP_MEAN, CLIP_STD, EncoderSpec, register_encoder


@register_encoder(
    name="conch", kind="image", architecture="CONCH v1 visual: timm vit_base_patch16_224 + attentional pooler",
    model_name="vit_base_patch16_224", input_size=224, mean=CLIP_MEAN, std=CLIP_STD, embed_dim=512,
    pooling="attn", poolings=("attn", "proj"), requires_weights=True,
    select_prefix=("visual.",),
    ignore_prefixes=("attn_pool_caption.", "ln_caption.", "head.", "trunk.head.", "trunk.fc_norm."),
    defaults={"img_size": 448, "patch_size": 16, "contrast_dim": 512, "attn_pooler_heads": 8},
    description="CONCH ViT-B/16 image tower, encode_image(proj_contrast=False)",
)
def build_conch(spec: EncoderSpec, weights: Path | None, overrides: Mapping[str, Any], seed: int, *,
                overrides_field: str | None = None) -> Any:
    """timm trunk + contrastive attentional pooler, seeded init, strict load of ``visual.*``."""
    import timm

    from morphomol.encoders._modules import ConchEncoder, ConchVisual
    from morphomol.encoders.base import build_random, jsonable, split_overrides
    from morphomol.encoders.weights import load_weights_into, read_encoder_state_dict, weights_id

    arch, enc = split_overrides(spec, overrides)
    arch = dict(arch)
    embed_dim = int(arch.pop("contrast_dim", 512))
    heads = int(arch.pop("attn_pooler_heads", 8))
    trunk_kwargs = dict(arch)
    trunk_kwargs.update(num_classes=0, global_pool="token", dynamic_img_size=True)

    def make() -> Any:
        trunk = timm.create_model(spec.model_name, pretrained=False, **trunk_kwargs)
        return ConchVisual(trunk, embed_dim, heads)

    sd = read_encoder_state_dict(weights, spec) if weights is not None else None
    model = build_random(make, seed)
    if sd is not None:
        load_weights_into(model, sd, source=weights, encoder=spec.name)
    return ConchEncoder(spec, model, config={**enc, "arch": jsonable({**arch, "contrast_dim": embed_dim})},
                        weights_id=weights_id(weights, seed))
