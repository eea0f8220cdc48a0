"""The spots study's head and its caption alignment (torch).

:class:`SpotModel`: ``body`` (Linear -> [BatchNorm] -> ReLU/GELU -> [Dropout] per hidden width) then
``out`` Linear(.., n_genes): the seed's head is ``hidden = [1024]`` (1536 -> 1024 -> 1000 on UNI2-h).
With alignment, ``align_head`` maps the *predicted gene vector* into the caption-embedding space
(linear, or one hidden layer); :func:`spots_loss` = MSE + λ(step)·mean(1 − cos) over the batch's spots
that have a caption, λ ramped linearly from 0 over the warm-up. The optimisation step counter is a
buffer of the model, so a resumed run continues the ramp where it stopped.

The gene head is built first from the run's seed, the alignment head after it: with λ = 0 the gene
head's initialisation, batches and updates are those of the same head without alignment.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from morphomol.studies.spots.settings import AlignSpec, HeadSpec


class SpotModel(nn.Module):
    def __init__(self, in_dim: int, n_genes: int, head: HeadSpec, align: AlignSpec | None = None,
                 text_dim: int | None = None, warmup_steps: int = 0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = int(in_dim)
        for w in head.hidden:
            layers.append(nn.Linear(d, int(w)))
            if head.batch_norm:
                layers.append(nn.BatchNorm1d(int(w)))
            layers.append(nn.GELU() if head.activation == "gelu" else nn.ReLU())
            if head.dropout > 0:
                layers.append(nn.Dropout(head.dropout))
            d = int(w)
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(d, int(n_genes))
        self.align = align
        self.align_head: nn.Module | None = None
        if align is not None:
            if not text_dim:
                raise ValueError("alignment needs the caption embedding width")
            self.align_head = (nn.Linear(n_genes, text_dim) if align.hidden is None else
                               nn.Sequential(nn.Linear(n_genes, align.hidden), nn.ReLU(), nn.Linear(align.hidden, text_dim)))
        self.warmup_steps = int(warmup_steps)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.out(self.body(batch["features"].float()))

    def param_groups(self, lr_head: float, lr_backbone: float) -> list[dict[str, Any]]:
        """One group (the encoder is frozen: only the heads train)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr_head}]

    def align_weight(self) -> float:
        """λ at the current step (linear warm-up to ``align.weight``)."""
        if self.align is None:
            return 0.0
        if self.warmup_steps <= 0:
            return float(self.align.weight)
        return float(self.align.weight) * min(1.0, float(self.step.item() + 1) / self.warmup_steps)

    def alignment_cosine(self, pred: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        assert self.align_head is not None
        return F.cosine_similarity(self.align_head(pred.float()), text.float(), dim=1, eps=1e-6)

    def param_counts(self) -> dict[str, int]:
        out = {"head": sum(p.numel() for n, p in self.named_parameters() if not n.startswith("align_head"))}
        if self.align_head is not None:
            out["align_head"] = sum(p.numel() for p in self.align_head.parameters())
        return out


def spots_loss(model: SpotModel, batch: dict[str, Any]) -> torch.Tensor:
    """MSE on the targets (+ λ·(1 − cos) on the spots with a caption when the model aligns)."""
    pred = model(batch)
    loss = F.mse_loss(pred.float(), batch["target"].float())
    if model.align_head is not None and model.training:
        lam = model.align_weight()
        mask = batch["has_text"].float()
        cos = model.alignment_cosine(pred, batch["text"])
        align = ((1.0 - cos) * mask).sum() / mask.sum().clamp(min=1.0)
        loss = loss + lam * align
        model.step += 1
    return loss
