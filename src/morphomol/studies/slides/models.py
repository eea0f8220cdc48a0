"""The alignment module: slide pooling, projection heads and the contrastive objective (imports torch).

* :class:`GatedABMIL`  gated attention-MIL pooling (Ilse et al. 2018; the TANGLE / CLAM layout):
  ``h = ReLU(W_e x)``, ``a = softmax_tiles(w_c^T (tanh(W_a h) * sigmoid(W_b h)))``, slide = ``sum a h``;
  padded tiles are masked out of the softmax.
* :class:`ProjectionHead`  Linear -> GELU -> Dropout -> Linear, L2-normalised output.
* :class:`AlignModel`  frozen slide features (a mean vector, or a bag through the ABMIL) and frozen
  RNA embeddings, each standardised with training-split statistics (buffers, saved with the
  checkpoint), projected into a shared space; symmetric InfoNCE with a learnable temperature
  (:mod:`morphomol.models.contrastive`). Only the heads, the ABMIL and the temperature train.

Batches follow the shared loop's contract (:mod:`morphomol.train.sources`): ``tile_id`` = slide ids,
``slide`` (B, D) or ``bag`` (B, T, D) + ``mask`` (B, T), ``rna`` (B, R).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from morphomol.models.contrastive import clip_loss, init_logit_scale, logit_scale_value


class GatedABMIL(nn.Module):
    """Gated attention pooling of a bag of tile features (B, T, D) with mask (B, T) -> (B, H)."""

    def __init__(self, in_dim: int, hidden: int = 256, attn_dim: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_a = nn.Linear(hidden, attn_dim)
        self.attention_b = nn.Linear(hidden, attn_dim)
        self.attention_c = nn.Linear(attn_dim, 1)
        self.out_dim = hidden

    def attention(self, bag: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tile embeddings (B, T, H), attention weights (B, T); zero on padding)."""
        h = self.encoder(bag)
        logits = self.attention_c(torch.tanh(self.attention_a(h)) * torch.sigmoid(self.attention_b(h))).squeeze(-1)
        logits = logits.masked_fill(~mask, float("-inf"))
        return h, torch.softmax(logits, dim=-1)

    def forward(self, bag: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h, a = self.attention(bag, mask)
        return torch.einsum("bt,bth->bh", a, h)


class ProjectionHead(nn.Module):
    """Linear -> GELU -> Dropout -> Linear, L2-normalised."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


class AlignModel(nn.Module):
    """Projection heads over frozen slide and RNA embeddings (+ a trainable ABMIL when ``bag``)."""

    def __init__(self, slide_dim: int, rna_dim: int, *, proj_dim: int, hidden: int, dropout: float,
                 temperature: float, bag: bool, slide_stats: tuple[np.ndarray, np.ndarray],
                 rna_stats: tuple[np.ndarray, np.ndarray]) -> None:
        super().__init__()
        self.bag = bool(bag)
        self.register_buffer("slide_mean", torch.as_tensor(slide_stats[0], dtype=torch.float32))
        self.register_buffer("slide_std", torch.as_tensor(slide_stats[1], dtype=torch.float32))
        self.register_buffer("rna_mean", torch.as_tensor(rna_stats[0], dtype=torch.float32))
        self.register_buffer("rna_std", torch.as_tensor(rna_stats[1], dtype=torch.float32))
        self.slide = GatedABMIL(slide_dim, hidden, max(1, hidden // 2), dropout) if self.bag else None
        self.slide_head = ProjectionHead(self.slide.out_dim if self.slide is not None else slide_dim, hidden, proj_dim,
                                         dropout)
        self.rna_head = ProjectionHead(rna_dim, hidden, proj_dim, dropout)
        self.logit_scale = init_logit_scale(temperature)

    # ---------------------------------------------------------------- encoders
    def embed_slide(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.bag:
            x = (batch["bag"].float() - self.slide_mean) / self.slide_std
            return self.slide_head(self.slide(x, batch["mask"].bool()))  # type: ignore[misc]
        return self.slide_head((batch["slide"].float() - self.slide_mean) / self.slide_std)

    def embed_rna(self, rna: torch.Tensor) -> torch.Tensor:
        return self.rna_head((rna.float() - self.rna_mean) / self.rna_std)

    @property
    def scale(self) -> torch.Tensor:
        return logit_scale_value(self.logit_scale)

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Symmetric InfoNCE over the batch (each slide's own RNA profile is its positive)."""
        return clip_loss(self.embed_slide(batch), self.embed_rna(batch["rna"]), self.scale)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:  # the shared loop's ``predict`` contract
        return self.embed_slide(batch)

    def param_groups(self, lr_head: float, lr_backbone: float) -> list[dict[str, Any]]:
        """One group: the heads, the ABMIL and the temperature (the encoders are frozen, outside)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr_head}]


@torch.no_grad()
def embed_all(model: AlignModel, arrays: dict[str, np.ndarray], batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(slide embeddings, RNA embeddings) of every row of ``arrays`` (eval mode, float32 numpy)."""
    model.eval()
    n = len(arrays["rna"])
    zs, zr = [], []
    for a in range(0, n, batch_size):
        b = {k: torch.from_numpy(np.ascontiguousarray(v[a:a + batch_size])) for k, v in arrays.items()}
        zs.append(model.embed_slide(b).cpu().numpy())
        zr.append(model.embed_rna(b["rna"]).cpu().numpy())
    return np.concatenate(zs).astype(np.float32), np.concatenate(zr).astype(np.float32)


@torch.no_grad()
def embed_rna_only(model: AlignModel, rna: np.ndarray) -> np.ndarray:
    model.eval()
    return model.embed_rna(torch.from_numpy(np.asarray(rna, np.float32))).cpu().numpy()


@torch.no_grad()
def frozen_slide_vectors(pool: GatedABMIL, bag: np.ndarray, mask: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Slide vectors of a frozen ABMIL over padded bags (no standardisation: the checkpoint's own input)."""
    pool.eval()
    out = []
    for a in range(0, len(bag), batch_size):
        out.append(pool(torch.from_numpy(bag[a:a + batch_size]).float(), torch.from_numpy(mask[a:a + batch_size])).numpy())
    return np.concatenate(out).astype(np.float32)


def load_frozen_abmil(path: str, in_dim: int) -> GatedABMIL:
    """A :class:`GatedABMIL` from safetensors (bare keys, or the ``slide.*`` keys of an ``abmil`` run's checkpoint)."""
    from safetensors.torch import load_file

    from morphomol.errors import InputError

    try:
        sd = load_file(path)
    except Exception as exc:
        raise InputError(f"cannot read safetensors ({type(exc).__name__}: {exc})", file=path,
                         field="slides.slide_encoder_weights", expected="a safetensors file") from None
    if any(k.startswith("slide.") for k in sd):
        sd = {k[len("slide."):]: v for k, v in sd.items() if k.startswith("slide.")}
    need = ("encoder.0.weight", "attention_a.weight", "attention_b.weight", "attention_c.weight")
    miss = [k for k in need if k not in sd]
    if miss:
        raise InputError(f"not a gated-ABMIL state dict (missing {', '.join(miss)})", file=path,
                         field="slides.slide_encoder_weights", expected="keys encoder.0.*, attention_a/b/c.*")
    hidden, d = sd["encoder.0.weight"].shape
    if d != in_dim:
        raise InputError(f"ABMIL input dim {d} but the tile features have {in_dim}", file=path,
                         field="slides.slide_encoder_weights", expected=f"an ABMIL over {in_dim}-d tile features")
    pool = GatedABMIL(int(d), int(hidden), int(sd["attention_a.weight"].shape[0]), 0.0)
    pool.load_state_dict(sd, strict=True)
    for p in pool.parameters():
        p.requires_grad_(False)
    return pool.eval()
