"""Optimizer parameter groups: a backbone with its own (small) learning rate, everything else the head's."""

from __future__ import annotations

from typing import Any

from torch import nn


def head_backbone_groups(model: nn.Module, backbone: nn.Module | None, lr_head: float,
                         lr_backbone: float) -> list[dict[str, Any]]:
    """AdamW groups ``head`` (every trainable parameter outside ``backbone``, ``lr_head``) and, when the
    backbone has trainable parameters, ``backbone`` (``lr_backbone``)."""
    trainable_backbone = [p for p in backbone.parameters() if p.requires_grad] if backbone is not None else []
    ids = {id(p) for p in trainable_backbone}
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups: list[dict[str, Any]] = [{"name": "head", "params": head, "lr": lr_head}]
    if trainable_backbone:
        groups.append({"name": "backbone", "params": trainable_backbone, "lr": lr_backbone})
    return groups
