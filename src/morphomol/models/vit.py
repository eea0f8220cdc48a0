"""The ViT-S morph encoder that runs *inside* a model (fine-tuned, early fusion, CLIP).

timm ``vit_small_patch16_224`` taking the loader's uint8 NHWC tiles (scaled to [0, 1] and normalised
with mean = std = 0.5 inside the model), with the token-level interface early fusion needs
(:meth:`ViTEncoder.embed` before the blocks, :meth:`ViTEncoder.encode` after). Its geometry is config
``model.vit``; local weights load through the encoder registry's one weight loader, with exactly the
rules of the ``vit_s`` feature encoder.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from morphomol.config.sections import ViTConfig
from morphomol.errors import InputError

GRID = 14
N_TOKENS = GRID * GRID
VIT_ARCH = "vit_small_patch16_224"


class ViTEncoder(nn.Module):
    """timm ``vit_small_patch16_224`` on uint8 ``(B, H, W, 3)`` tiles; output = CLS embedding.

    ``vit_cfg`` overrides timm's geometry (``embed_dim``, ``depth``, ``num_heads``, and for
    tests ``img_size``/``patch_size`` as long as the token grid stays 14×14).
    """

    def __init__(self, vit_cfg: ViTConfig | Mapping[str, Any] | None = None, weights: str | Path | None = None) -> None:
        super().__init__()
        import timm

        cfg = vit_cfg.timm_kwargs() if isinstance(vit_cfg, ViTConfig) else dict(vit_cfg or {})
        allowed = {"embed_dim", "depth", "num_heads", "img_size", "patch_size", "mlp_ratio", "drop_path_rate"}
        unknown = set(cfg) - allowed
        if unknown:
            raise InputError(f"unknown ViT option(s) {sorted(unknown)}", field="model.vit",
                             expected=", ".join(sorted(allowed)))
        try:
            self.vit = timm.create_model(VIT_ARCH, pretrained=False, num_classes=0, **cfg)
        except (TypeError, AssertionError, ValueError) as exc:
            raise InputError(f"cannot build {VIT_ARCH} with {cfg}: {exc}", field="model.vit") from None
        if tuple(self.vit.patch_embed.grid_size) != (GRID, GRID):
            raise InputError(f"token grid {tuple(self.vit.patch_embed.grid_size)} is not {GRID}x{GRID}",
                             field="model.vit", expected="img_size / patch_size == 14")
        self.dim: int = int(self.vit.embed_dim)
        self.img_size: int = int(self.vit.patch_embed.img_size[0])
        self.pretrained = False
        if weights:
            self.load_weights(weights)

    def load_weights(self, path: str | Path) -> None:
        """Load local weights with the registry's one weight loader (the rules of the ``vit_s`` encoder)."""
        from morphomol.encoders.weights import load_timm_vit_weights

        load_timm_vit_weights(self.vit, path)
        self.pretrained = True

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> float NCHW in [-1, 1] (mean = std = 0.5). The permute keeps channels-last strides."""
        x = image.permute(0, 3, 1, 2).float()
        return x.mul_(2.0 / 255.0).sub_(1.0)  # (x / 255 - 0.5) / 0.5

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """Patch embeddings + CLS + positional embeddings: ``(B, 1 + 196, d)`` (before the blocks)."""
        v = self.vit
        x = v.patch_embed(self.normalise(image))
        x = v._pos_embed(x)
        x = v.patch_drop(x)
        return v.norm_pre(x)

    @property
    def patch_pos_embed(self) -> torch.Tensor:
        """Positional embeddings of the 196 patch positions, ``(1, 196, d)``."""
        return self.vit.pos_embed[:, -N_TOKENS:]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Transformer blocks + final norm + CLS pooling on an embedded sequence -> ``(B, d)``."""
        v = self.vit
        x = v.norm(v.blocks(x))
        return v.forward_head(x, pre_logits=True)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encode(self.embed(image))
