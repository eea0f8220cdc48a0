"""timm Vision Transformers: ``vit_s`` (the paper's morphology encoder), ``uni``, ``uni2h``.

* ``vit_s``  timm ``vit_small_patch16_224`` (384-d CLS), mean = std = 0.5 as in the paper's code;
  weights optional: without them a seeded random init (``random-init:seed=N``) gives the same
  features on every run. Its geometry (``embed_dim``, ``depth``, ``num_heads``) comes from config
  ``model.vit`` so the demo's reduced ViT is the same network everywhere; the fusion model's
  trainable ViT loads ``encoders.vit_s.weights`` through the same rules
  (:func:`morphomol.encoders.weights.load_timm_vit_weights`).
* ``uni``    UNI: ``timm.create_model("vit_large_patch16_224", img_size=224, patch_size=16,
  init_values=1e-5, num_classes=0, dynamic_img_size=True)``; ImageNet mean/std; CLS (1024-d).
* ``uni2h``  UNI2-h: ``timm.create_model("vit_giant_patch14_224", img_size=224, patch_size=14,
  depth=24, num_heads=24, init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667*2, num_classes=0,
  no_embed_class=True, mlp_layer=SwiGLUPacked, act_layer=SiLU, reg_tokens=8,
  dynamic_img_size=True)``; ImageNet mean/std; CLS (1536-d).

Checkpoints are timm state dicts; a classification head (``head.*``, ``fc_norm.*``) is ignored.
Torch-free at import: timm and the module classes are imported by the builder.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from morphomol.encoders.registry import HALF, IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, register_encoder
from morphomol.errors import InputError

#: keys of a timm checkpoint that the pooled feature extractor has no use for
TIMM_IGNORE = ("head.", "fc_norm.")
VIT_POOLINGS = ("cls", "mean", "cls+mean")


def resolve_layer(name: str, field: str = "overrides") -> Any:
    """A layer class named in overrides (``SwiGLUPacked``, ``SiLU``, ``GELU``)."""
    import timm.layers
    from torch import nn

    if name == "SwiGLUPacked":
        return timm.layers.SwiGLUPacked
    if name == "SiLU":
        return nn.SiLU
    if name == "GELU":
        return nn.GELU
    raise InputError(f"unknown layer '{name}'", field=field, expected="SwiGLUPacked|SiLU|GELU")


@register_encoder(
    name="vit_s", kind="image", architecture="timm vit_small_patch16_224", model_name="vit_small_patch16_224",
    input_size=224, mean=HALF, std=HALF, embed_dim=384, pooling="cls", poolings=VIT_POOLINGS,
    requires_weights=False, ignore_prefixes=TIMM_IGNORE,
    defaults={"embed_dim": 384, "depth": 12, "num_heads": 6},
    description="ViT-S/16 (paper's morph encoder); random init with a fixed seed when no weights",
)
@register_encoder(
    name="uni", kind="image", architecture="timm vit_large_patch16_224 (UNI)", model_name="vit_large_patch16_224",
    input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, embed_dim=1024, pooling="cls", poolings=VIT_POOLINGS,
    requires_weights=True, ignore_prefixes=TIMM_IGNORE,
    defaults={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
    description="UNI ViT-L/16",
)
@register_encoder(
    name="uni2h", kind="image", architecture="timm vit_giant_patch14_224 as ViT-H/14+8reg SwiGLU (UNI2-h)",
    model_name="vit_giant_patch14_224", input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, embed_dim=1536,
    pooling="cls", poolings=VIT_POOLINGS, requires_weights=True, ignore_prefixes=TIMM_IGNORE,
    defaults={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
              "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True,
              "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU", "reg_tokens": 8, "dynamic_img_size": True},
    description="UNI2-h ViT-H/14 with 8 register tokens",
)
def build_timm_vit(spec: EncoderSpec, weights: Path | None, overrides: Mapping[str, Any], seed: int, *,
                   overrides_field: str | None = None) -> Any:
    """``timm.create_model(spec.model_name, num_classes=0, global_pool='token', **arch)``, seeded
    random init, then (weights given) a strict load with the spec's key rules."""
    import timm

    from morphomol.encoders._modules import TimmViTEncoder
    from morphomol.encoders.base import build_random, jsonable, split_overrides
    from morphomol.encoders.weights import load_weights_into, read_encoder_state_dict, weights_id

    field = overrides_field or f"encoders.{spec.name}.overrides"
    arch, enc = split_overrides(spec, overrides)
    kwargs = dict(arch)
    for key in ("mlp_layer", "act_layer"):
        if isinstance(kwargs.get(key), str):
            kwargs[key] = resolve_layer(kwargs[key], field)
    kwargs.setdefault("num_classes", 0)
    kwargs["global_pool"] = "token"
    sd = None
    if weights is not None:  # read (and validate) the file before building a large model
        sd = read_encoder_state_dict(weights, spec)
    try:
        model = build_random(lambda: timm.create_model(spec.model_name, pretrained=False, **kwargs), seed)
    except (TypeError, AssertionError, ValueError) as exc:
        raise InputError(f"cannot build {spec.model_name} with {arch}: {exc}", field=field) from None
    if sd is not None:
        load_weights_into(model, sd, source=weights, encoder=spec.name)
    return TimmViTEncoder(spec, model, config={**enc, "arch": jsonable(arch)}, weights_id=weights_id(weights, seed))
