"""The ``bulkrnabert`` module (imports torch; built by :mod:`morphomol.encoders.bulk_rna`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from morphomol.encoders.registry import EncoderSpec
from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("encoders.bulk_rna")


class BulkRNACore(nn.Module):
    """Gene + bin embeddings, a pre-norm transformer encoder over genes, LayerNorm, mean over genes."""

    def __init__(self, n_genes: int, n_bins: int, embed_dim: int, depth: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.gene_embedding = nn.Embedding(n_genes, embed_dim)
        self.bin_embedding = nn.Embedding(n_bins, embed_dim)
        layer = nn.TransformerEncoderLayer(embed_dim, num_heads, ffn_dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, bins: torch.Tensor) -> torch.Tensor:  # (B, G) int64 -> (B, D)
        pos = torch.arange(bins.shape[1], device=bins.device)
        x = self.bin_embedding(bins) + self.gene_embedding(pos)[None]
        return self.norm(self.layers(x)).mean(dim=1)


class BulkRNAEncoder(nn.Module):
    """Frozen bulk-RNA encoder: linear TPM (B, G_in) over ``set_genes`` names -> (B, D) embeddings."""

    def __init__(self, spec: EncoderSpec, cfg: Mapping[str, Any], *, config: Mapping[str, Any], weights_id: str) -> None:
        super().__init__()
        self.spec, self.config, self.weights_id = spec, dict(config), weights_id
        self.vocab = list(cfg["genes"])
        self.n_bins, self.max_value = int(cfg["n_bins"]), float(cfg["max_value"])
        self.core = BulkRNACore(len(self.vocab), self.n_bins, int(cfg["embed_dim"]), int(cfg["depth"]),
                                int(cfg["num_heads"]), int(cfg["ffn_dim"]))
        self.dim = int(cfg["embed_dim"])
        self.pooling = "mean"
        self._cols: np.ndarray | None = None
        self._have: np.ndarray | None = None

    def freeze(self) -> BulkRNAEncoder:
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def set_genes(self, genes: Sequence[str]) -> None:
        """Map the input's gene order onto the vocabulary (missing vocabulary genes read as 0 TPM)."""
        pos = {str(g): i for i, g in enumerate(genes)}
        cols = np.array([pos.get(g, -1) for g in self.vocab], np.int64)
        if (cols < 0).all():
            raise InputError("none of the input genes is in the bulk-RNA model's vocabulary", field="genes",
                             expected="gene symbols of genes.txt")
        n_missing = int((cols < 0).sum())
        if n_missing:
            log.info("bulkrnabert: %d of %d vocabulary genes are not in the data (set to 0 TPM)", n_missing,
                     len(self.vocab))
        self._cols, self._have = np.maximum(cols, 0), cols >= 0

    def tokenize(self, values: torch.Tensor) -> torch.Tensor:
        """Linear TPM (B, G_in) -> bin ids (B, G_vocab) of log10(1 + TPM) over [0, max_value]."""
        if self._cols is None or self._have is None:
            raise InputError("expression encoder needs gene names", field="genes", expected="set_genes(genes) first")
        v = values.float()[:, torch.from_numpy(self._cols).to(values.device)]
        v = v * torch.from_numpy(self._have).to(values.device, v.dtype)
        x = torch.log10(1.0 + v.clamp_min(0.0))
        return (x / self.max_value * self.n_bins).floor().clamp(0, self.n_bins - 1).long()

    def forward(self, values: torch.Tensor | np.ndarray) -> torch.Tensor:
        v = torch.as_tensor(values)
        dev = next(self.core.parameters()).device
        return self.core(self.tokenize(v.to(dev)))
