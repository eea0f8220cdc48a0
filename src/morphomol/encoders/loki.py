"""OmiCLIP / Loki image encoder (``loki``).

The image tower of open_clip ``coca_ViT-L-14``, built by open_clip's own ``_build_vision_tower``
from the ``coca_ViT-L-14`` model config, i.e. exactly
``open_clip.create_model('coca_ViT-L-14', pretrained=None).visual`` without building the text
towers; OpenAI CLIP mean/std; the attention-pooled, projected image latent (768-d, not
L2-normalised). Checkpoint keys ``visual.*`` (text/decoder keys are ignored); an open_clip
training checkpoint (``{"epoch", "state_dict": {"module.visual.*", ...}}``) loads as is.
Torch-free at import.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from morphomol.encoders.registry import CLIP_MEAN, CLIP_STD, EncoderSpec, register_encoder
from morphomol.errors import InputError


@register_encoder(
    name="loki", kind="image", architecture="open_clip coca_ViT-L-14 image tower (OmiCLIP/Loki)",
    model_name="coca_ViT-L-14", input_size=224, mean=CLIP_MEAN, std=CLIP_STD, embed_dim=768,
    pooling="latent", poolings=("latent",), requires_weights=True, select_prefix=("visual.",),
    weight_files=("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors",
                  "pytorch_model.bin", "checkpoint.pt"),
    description="Loki/OmiCLIP image encoder (CoCa ViT-L/14 visual)",
)
def build_loki(spec: EncoderSpec, weights: Path | None, overrides: Mapping[str, Any], seed: int, *,
               overrides_field: str | None = None) -> Any:
    """open_clip vision tower from the model config (+ ``embed_dim`` / CLIPVisionCfg overrides)."""
    import open_clip
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    from morphomol.encoders._modules import OpenClipVisualEncoder
    from morphomol.encoders.base import build_random, jsonable, split_overrides
    from morphomol.encoders.weights import load_weights_into, read_encoder_state_dict, weights_id

    field = overrides_field or f"encoders.{spec.name}.overrides"
    arch, enc = split_overrides(spec, overrides)
    cfg = copy.deepcopy(open_clip.get_model_config(spec.model_name))
    if cfg is None:  # pragma: no cover - open_clip without its bundled configs
        raise InputError(f"open_clip has no '{spec.model_name}' config", field=spec.name)
    embed_dim = int(arch.pop("embed_dim", cfg["embed_dim"]))
    vision = dict(cfg["vision_cfg"])
    vision.update(arch.pop("vision_cfg", {}) or {})
    fields = set(CLIPVisionCfg.__dataclass_fields__)
    for k in list(arch):
        if k in fields:
            vision[k] = arch.pop(k)
    if arch:
        raise InputError(f"unknown overrides {sorted(arch)}", field=field,
                         expected=f"embed_dim or CLIPVisionCfg fields {sorted(fields)}")
    quick_gelu = bool(cfg.get("quick_gelu", False))
    sd = read_encoder_state_dict(weights, spec) if weights is not None else None
    model = build_random(lambda: _build_vision_tower(embed_dim, CLIPVisionCfg(**vision), quick_gelu, None), seed)
    enc.setdefault("input_size", int(vision.get("image_size", 224)))
    if sd is not None:
        load_weights_into(model, sd, source=weights, encoder=spec.name)
    return OpenClipVisualEncoder(spec, model, embed_dim,
                                 config={**enc, "arch": {"embed_dim": embed_dim, "vision_cfg": jsonable(vision)}},
                                 weights_id=weights_id(weights, seed))
