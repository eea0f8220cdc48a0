"""Contrastive alignment: the symmetric InfoNCE loss and a learnable, clamped temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: the logit scale (inverse temperature) is clamped to [0, log 100] before exponentiation (CLIP)
MAX_LOGIT_SCALE = math.log(100.0)


def init_logit_scale(temperature: float = 0.07) -> nn.Parameter:
    """A learnable log inverse temperature, ``log(1/temperature)`` at start."""
    return nn.Parameter(torch.tensor(math.log(1 / temperature)))


def logit_scale_value(logit_scale: torch.Tensor) -> torch.Tensor:
    """``exp(clamp(logit_scale, 0, log 100))``."""
    return logit_scale.clamp(0.0, MAX_LOGIT_SCALE).exp()


def clip_loss(img: torch.Tensor, expr: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: cross-entropy image→expression and expression→image, averaged."""
    logits = scale * img @ expr.t()
    labels = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
