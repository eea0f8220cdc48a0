"""Every model variant of Table A.1 / A.2, built from one :class:`~morphomol.studies.fusion.settings.ModelSetting`.

A setting (one row of ``config/experiments/table_a1.yaml``) names a fusion stage
(``early`` | ``late`` | ``none``), a fusion strategy (``add`` | ``concat``), a morphology
encoder, an expression encoder and a transcript aggregation (``tile`` | ``token``).
:func:`build_model` turns it into one :class:`MorphoMolModel` assembled from four parts:

* :class:`~morphomol.models.vit.ViTEncoder` — the ViT-S run inside the model;
* :class:`~morphomol.models.mlp.ExprMLP` — the expression encoder, applied to ``log1p`` counts per
  token (``(B, 196, G)``) or per tile (``(B, G)``);
* cached frozen features (any image encoder of the registry, a frozen ViT-S, Geneformer) passed in
  the batch as ``morph_feat`` / ``expr_feat`` — those encoders never run inside the trainer;
* a linear head on the fused embedding.

Forward pass per stage (``z`` is what the linear head sees)::

    early add     tokens = patch_embed(img) + pos ; tokens[1:] += MLP(log1p(x_core^i))  -> blocks -> CLS
    early concat  [CLS+pos0, patch_embed(img)+pos, MLP(log1p(x_core^i))+pos]           -> blocks -> CLS
                  (sequence 1 + 196 + 196; both token streams share the image pos-embed)
    late          z = z_img (+ or concat) z_core     z_img = CLS of the ViT or cached feature
                                                      z_core = MLP(tile) | mean_i MLP(token_i) | W·geneformer
    none          z = z_img  (morph-only)  or  z = z_core (expr-only, 1-layer MLP with 32 units)

The expression MLP is *zero-preserving* (``f(x) - f(0)``): early-fusion ``add`` on a tile without
transcripts reduces exactly to the morph-only ViT on the same weights.

:class:`ClipModel` (Table A.2) pairs the same ViT with the same MLP (tile-level vector or mean of
token embeddings) through projection heads and a learnable temperature.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from morphomol.config.sections import ModelConfig, ViTConfig
from morphomol.models.groups import head_backbone_groups
from morphomol.models.contrastive import clip_loss, init_logit_scale, logit_scale_value
from morphomol.models.mlp import ExprMLP
from morphomol.models.vit import ViTEncoder
from morphomol.studies.fusion.settings import MLP, ModelSetting

__all__ = ["MorphoMolModel", "ClipModel", "build_model", "build_clip_model", "clip_loss"]


# --------------------------------------------------------------------------- regression (Table A.1)


class MorphoMolModel(nn.Module):
    """One model for every regression setting of Table A.1 (see the module docstring)."""

    def __init__(
        self,
        setting: ModelSetting,
        n_core: int,
        n_targets: int,
        *,
        vit_cfg: ViTConfig | dict[str, Any] | None = None,
        vit_weights: str | Path | None = None,
        expr_hidden: int = 32,
        morph_dim: int | None = None,
        expr_dim: int | None = None,
    ) -> None:
        super().__init__()
        if setting.kind != "regression":
            raise ValueError(f"setting {setting.name} is kind={setting.kind}, not a regression model")
        self.setting = setting
        s = setting
        self.vit: ViTEncoder | None = ViTEncoder(vit_cfg, vit_weights) if s.runs_vit else None
        if self.vit is not None and s.freeze_morph:
            self.vit.requires_grad_(False)
            self.vit.eval()

        # width of the morphology embedding z_img
        if self.vit is not None:
            d_img = self.vit.dim
        elif s.morph_cache is not None:
            if not morph_dim:
                raise ValueError(f"setting {s.name}: morph_dim (width of cached {s.morph_cache} features) is required")
            d_img = int(morph_dim)
        else:
            d_img = 0

        # expression encoder -> z_core of width d_img (fusion) or its own width (expr-only)
        self.expr: nn.Module | None = None
        d_expr = 0
        if s.expr_encoder == MLP:
            if s.fusion_stage == "none":
                self.expr = ExprMLP(n_core, expr_hidden, out_dim=None, layers=1)
            else:
                self.expr = ExprMLP(n_core, expr_hidden, out_dim=d_img, layers=2)
            d_expr = self.expr.out_dim  # type: ignore[assignment]
        elif s.expr_cache is not None:
            if not expr_dim:
                raise ValueError(f"setting {s.name}: expr_dim (width of cached {s.expr_cache} features) is required")
            # expr-only: linear probe on the frozen features; fusion: project to the morph width
            self.expr = nn.Identity() if s.fusion_stage == "none" else nn.Linear(int(expr_dim), d_img)
            d_expr = int(expr_dim) if s.fusion_stage == "none" else d_img

        if s.fusion_stage == "early" or (s.fusion_stage == "late" and s.fusion_strategy == "add"):
            d_z = d_img
        elif s.fusion_stage == "late":
            d_z = d_img + d_expr
        else:
            d_z = d_img or d_expr
        self.head = nn.Linear(d_z, n_targets)
        self.n_core, self.n_targets, self.d_z = n_core, n_targets, d_z

    # ---- parts of the forward pass
    def train(self, mode: bool = True) -> MorphoMolModel:
        super().train(mode)
        if self.vit is not None and self.setting.freeze_morph:
            self.vit.eval()  # a frozen backbone stays in eval mode
        return self

    def morph_embedding(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.vit is not None:
            return self.vit(batch["image"])
        return batch["morph_feat"].float()

    def expr_embedding(self, batch: dict[str, Any]) -> torch.Tensor:
        s = self.setting
        assert self.expr is not None
        if s.expr_cache is not None:
            return self.expr(batch["expr_feat"].float())
        if s.expr_aggregation == "tile":
            return self.expr(torch.log1p(batch["tile"].float()))
        return self.expr(torch.log1p(batch["tokens"].float())).mean(dim=1)

    def early_sequence(self, batch: dict[str, Any]) -> torch.Tensor:
        """The fused token sequence entering the ViT blocks."""
        assert self.vit is not None and self.expr is not None
        x = self.vit.embed(batch["image"])  # (B, 1+196, d), pos-embed included
        e = self.expr(torch.log1p(batch["tokens"].float())).to(x.dtype)  # (B, 196, d)
        if self.setting.fusion_strategy == "add":
            return torch.cat([x[:, :1], x[:, 1:] + e], dim=1)
        return torch.cat([x, e + self.vit.patch_pos_embed.to(x.dtype)], dim=1)  # (B, 1+196+196, d)

    def embedding(self, batch: dict[str, Any]) -> torch.Tensor:
        """The representation the linear head sees, ``(B, d_z)``."""
        s = self.setting
        if s.fusion_stage == "early":
            assert self.vit is not None
            return self.vit.encode(self.early_sequence(batch))
        if s.fusion_stage == "late":
            z_img, z_core = self.morph_embedding(batch), self.expr_embedding(batch)
            z_core = z_core.to(z_img.dtype)
            return z_img + z_core if s.fusion_strategy == "add" else torch.cat([z_img, z_core], dim=1)
        return self.morph_embedding(batch) if s.morph_encoder is not None else self.expr_embedding(batch)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.head(self.embedding(batch))

    # ---- optimisation
    def param_groups(self, lr_head: float, lr_backbone: float) -> list[dict[str, Any]]:
        """AdamW groups: ``backbone`` (trainable ViT, lr_backbone) and ``head`` (head + expression encoder)."""
        return head_backbone_groups(self, self.vit, lr_head, lr_backbone)

    def param_counts(self) -> dict[str, int]:
        """Parameter counts in the spirit of Table A.3 (cached frozen encoders are not counted)."""
        head = sum(p.numel() for p in self.head.parameters())
        backbone = [p for n, p in self.named_parameters() if not n.startswith("head.")]
        return {"head": head, "backbone_total": sum(p.numel() for p in backbone),
                "backbone_trainable": sum(p.numel() for p in backbone if p.requires_grad)}


def build_model(
    setting: ModelSetting,
    n_core: int,
    n_targets: int,
    model_cfg: ModelConfig,
    *,
    vit_weights: str | Path | None = None,
    morph_dim: int | None = None,
    expr_dim: int | None = None,
) -> MorphoMolModel:
    """Build the model of a regression setting from config ``model`` (``vit``, ``expr_hidden``)."""
    return MorphoMolModel(setting, n_core, n_targets, vit_cfg=model_cfg.vit, vit_weights=vit_weights,
                          expr_hidden=model_cfg.expr_hidden, morph_dim=morph_dim, expr_dim=expr_dim)


# --------------------------------------------------------------------------- CLIP (Table A.2)


class ClipModel(nn.Module):
    """ViT image encoder vs core-transcript encoder, projection heads, learnable temperature.

    ``tile`` aggregation encodes the tile-level core vector; ``token`` encodes every token and
    averages the token embeddings. Both towers end in a linear projection to ``proj_dim`` and
    L2 normalisation. ``logit_scale`` starts at ``log(1/0.07)`` and is clamped to ``[0, log 100]``.
    """

    def __init__(self, setting: ModelSetting, n_core: int, *, vit_cfg: ViTConfig | dict[str, Any] | None = None,
                 vit_weights: str | Path | None = None, expr_hidden: int = 32, proj_dim: int = 128) -> None:
        super().__init__()
        if setting.kind != "clip":
            raise ValueError(f"setting {setting.name} is not a CLIP setting")
        self.setting = setting
        self.vit = ViTEncoder(vit_cfg, vit_weights)
        if setting.freeze_morph:
            self.vit.requires_grad_(False)
        self.expr = ExprMLP(n_core, expr_hidden, out_dim=None, layers=2)
        self.img_proj = nn.Linear(self.vit.dim, proj_dim)
        self.expr_proj = nn.Linear(self.expr.out_dim, proj_dim)
        self.logit_scale = init_logit_scale(0.07)

    def encode_image(self, batch: dict[str, Any]) -> torch.Tensor:
        return F.normalize(self.img_proj(self.vit(batch["image"])).float(), dim=-1)

    def encode_expr(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.setting.expr_aggregation == "tile":
            h = self.expr(torch.log1p(batch["tile"].float()))
        else:
            h = self.expr(torch.log1p(batch["tokens"].float())).mean(dim=1)
        return F.normalize(self.expr_proj(h).float(), dim=-1)

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(batch), self.encode_expr(batch)

    def scale(self) -> torch.Tensor:
        return logit_scale_value(self.logit_scale)

    def param_groups(self, lr_head: float, lr_backbone: float) -> list[dict[str, Any]]:
        return head_backbone_groups(self, self.vit, lr_head, lr_backbone)


def build_clip_model(setting: ModelSetting, n_core: int, model_cfg: ModelConfig, *,
                     vit_weights: str | Path | None = None) -> ClipModel:
    return ClipModel(setting, n_core, vit_cfg=model_cfg.vit, vit_weights=vit_weights,
                     expr_hidden=model_cfg.expr_hidden, proj_dim=model_cfg.clip_proj_dim)
