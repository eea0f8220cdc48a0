"""Small trained parts shared by the studies' models."""

from __future__ import annotations

import torch
from torch import nn


class ExprMLP(nn.Module):
    """Expression encoder on ``log1p`` counts, applied to the last axis (tile ``(B,G)`` or tokens ``(B,196,G)``).

    ``layers=2``: ``Linear(G,h)-ReLU-Linear(h,h)``, then (``out_dim`` given) ``ReLU-Linear(h,out_dim)``
    projecting to the ViT token width. ``layers=1``: ``Linear(G,h)-ReLU`` (the expr-only MLP).
    Zero-preserving: returns ``f(x) - f(0)`` (exactly 0 where the input row is all zeros), so an
    empty patch maps to a zero token while the layers keep their biases.
    """

    def __init__(self, n_in: int, hidden: int = 32, out_dim: int | None = None, layers: int = 2) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Linear(n_in, hidden), nn.ReLU()]
        if layers >= 2:
            mods.append(nn.Linear(hidden, hidden))
            for _ in range(layers - 2):
                mods += [nn.ReLU(), nn.Linear(hidden, hidden)]
        if out_dim is not None:
            if layers >= 2:
                mods.append(nn.ReLU())
            mods.append(nn.Linear(hidden, out_dim))
        self.net = nn.Sequential(*mods)
        self.n_in = n_in
        self.out_dim = out_dim if out_dim is not None else hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x) - self.net(x.new_zeros(self.n_in))
        # f(x) - f(0) is zero up to rounding (batched and single-row matmuls round differently);
        # the mask makes an empty patch / tile exactly zero.
        return out * (x != 0).any(dim=-1, keepdim=True).to(out.dtype)
