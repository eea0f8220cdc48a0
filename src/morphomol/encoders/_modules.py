"""The ``nn.Module`` classes of every encoder family (imports torch).

Kept apart from the family modules (``timm_vit``, ``conch``, ``hf_vit``, ``loki``,
``geneformer``), which register encoders and hold the building logic but must stay torch-free at
import; their builders import this module when an encoder is created.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from morphomol.encoders.base import Encoder, pool_tokens
from morphomol.encoders.registry import EncoderSpec
from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("encoders")


# ----------------------------------------------------------------------------- timm ViT


class TimmViTEncoder(Encoder):
    """timm VisionTransformer (``global_pool='token'``, ``num_classes=0``): pooled from
    ``forward_features`` (after the final norm), so checkpoint keys match the published ones."""

    def __init__(self, spec: EncoderSpec, model: nn.Module, **kw: Any) -> None:
        super().__init__(spec, **kw)
        self.model = model
        width = int(model.num_features)
        self.dim = 2 * width if self.pooling == "cls+mean" else width

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(x)
        return pool_tokens(tokens, int(self.model.num_prefix_tokens), self.pooling)

    def forward_tokens(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        tokens = self.model.forward_features(self.preprocess(images))
        return tokens[:, int(self.model.num_prefix_tokens) :]


# -------------------------------------------------------------------------------- CONCH


class ConchAttentionalPooler(nn.Module):
    """CONCH's AttentionalPooler (sequence-first MultiheadAttention, LayerNorm on q and k)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x).permute(1, 0, 2)
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, x.shape[1], -1)
        out = self.attn(q, x, x, need_weights=False)[0]
        return out.permute(1, 0, 2)


class ConchVisual(nn.Module):
    """CONCH's ``VisualModel`` without the captioning pooler: timm trunk + contrastive head."""

    def __init__(self, trunk: nn.Module, embed_dim: int, heads: int) -> None:
        super().__init__()
        self.trunk = trunk
        width = int(trunk.num_features)
        self.attn_pool_contrast = ConchAttentionalPooler(embed_dim, width, heads, 1)
        self.ln_contrast = nn.LayerNorm(embed_dim)
        self.proj_contrast = nn.Parameter(width**-0.5 * torch.randn(embed_dim, embed_dim))


class ConchEncoder(Encoder):
    def __init__(self, spec: EncoderSpec, model: ConchVisual, **kw: Any) -> None:
        super().__init__(spec, **kw)
        self.model = model
        self.dim = int(model.ln_contrast.normalized_shape[0])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.trunk.forward_features(x)
        pooled = self.model.ln_contrast(self.model.attn_pool_contrast(tokens)[:, 0])
        if self.pooling == "proj":
            pooled = pooled @ self.model.proj_contrast
        return pooled

    def forward_tokens(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        tokens = self.model.trunk.forward_features(self.preprocess(images))
        return tokens[:, int(self.model.trunk.num_prefix_tokens) :]


# ---------------------------------------------------------------------- transformers ViT


class HFViTEncoder(Encoder):
    def __init__(self, spec: EncoderSpec, model: nn.Module, **kw: Any) -> None:
        super().__init__(spec, **kw)
        self.model = model
        width = int(model.config.hidden_size)
        self.dim = 2 * width if self.pooling == "cls+mean" else width

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.model(pixel_values=x).last_hidden_state
        return pool_tokens(hidden, 1, self.pooling)

    def forward_tokens(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        return self.model(pixel_values=self.preprocess(images)).last_hidden_state[:, 1:]


# ------------------------------------------------------------------------ open_clip (Loki)


class OpenClipVisualEncoder(Encoder):
    def __init__(self, spec: EncoderSpec, model: nn.Module, out_dim: int, **kw: Any) -> None:
        super().__init__(spec, **kw)
        self.model = model
        self.dim = int(out_dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        pooled = out[0] if isinstance(out, tuple) else out
        return pooled


# ---------------------------------------------------------------------------- Geneformer


class GeneformerEncoder(nn.Module):
    """Geneformer-style rank-value encoding + BertModel, mean-pooled over gene tokens.

    Tokenisation of one tile (count vector over ``genes``): counts / total * ``target_sum`` /
    per-gene median factor; genes with zero or unknown token are dropped; the rest are sorted by
    normalised value descending (ties: gene order) and the first ``max_len`` (minus the special
    tokens) become ``input_ids`` (``<cls> ... <eos>`` when the vocabulary has them).
    """

    def __init__(
        self,
        spec: EncoderSpec,
        model: nn.Module,
        token_dict: Mapping[str, int],
        medians: Mapping[str, float],
        name_to_id: Mapping[str, str] | None,
        *,
        config: Mapping[str, Any],
        weights_id: str,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.config = dict(config)
        self.weights_id = weights_id
        self.model = model
        self.token_dict = {str(k): int(v) for k, v in token_dict.items()}
        self.medians = {str(k): float(v) for k, v in medians.items()}
        self.name_to_id = {str(k): str(v) for k, v in (name_to_id or {}).items()}
        self.pad_id = int(self.token_dict.get("<pad>", getattr(model.config, "pad_token_id", 0) or 0))
        self.cls_id = self.token_dict.get("<cls>")
        self.eos_id = self.token_dict.get("<eos>")
        self.max_len = int(self.config.get("max_input_size", model.config.max_position_embeddings))
        self.target_sum = float(self.config.get("target_sum", 10_000.0))
        self.dim = int(model.config.hidden_size)
        self.pooling = "mean"
        self.genes: list[str] | None = None
        self._map_cache: tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray] | None = None

    def freeze(self) -> GeneformerEncoder:
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def set_genes(self, genes: Sequence[str]) -> None:
        self.genes = [str(g) for g in genes]

    def _mapping(self, genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        key = tuple(str(g) for g in genes)
        if self._map_cache is not None and self._map_cache[0] == key:
            return self._map_cache[1:]
        cols, toks, meds = [], [], []
        for j, g in enumerate(key):
            gid = self.name_to_id.get(g, g)
            tok = self.token_dict.get(gid)
            med = self.medians.get(gid)
            if tok is None or med is None or not med > 0:
                continue
            cols.append(j)
            toks.append(tok)
            meds.append(med)
        if not cols:
            raise InputError(
                "none of the genes is in the Geneformer vocabulary",
                field="genes",
                expected="gene symbols mapped by gene_name_id_dict.json, or Ensembl ids of token_dictionary.json",
            )
        if len(cols) < len(key):
            log.info("geneformer: %d of %d genes are in the vocabulary", len(cols), len(key))
        out = (np.asarray(cols, np.int64), np.asarray(toks, np.int64), np.asarray(meds, np.float64))
        self._map_cache = (key, *out)
        return out

    def tokenize(self, counts: np.ndarray | torch.Tensor, genes: Sequence[str] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        genes = genes if genes is not None else self.genes
        if genes is None:
            raise InputError("expression encoder needs gene names", field="genes",
                             expected="set_genes(genes) or genes=...")
        c = counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
        if c.ndim == 1:
            c = c[None]
        if c.shape[1] != len(genes):
            raise InputError(f"counts have {c.shape[1]} columns but {len(genes)} genes were given",
                             field="genes", expected="one gene name per column")
        cols, toks, meds = self._mapping(genes)
        c = c.astype(np.float64)
        total = c.sum(axis=1, keepdims=True)
        total[total == 0] = 1.0
        norm = c[:, cols] / total * self.target_sum / meds[None, :]
        n_special = int(self.cls_id is not None) + int(self.eos_id is not None)
        budget = max(1, self.max_len - n_special)
        rows = []
        for r in range(norm.shape[0]):
            v = norm[r]
            nz = np.flatnonzero(v > 0)
            order = nz[np.argsort(-v[nz], kind="stable")][:budget]
            ids = toks[order].tolist()
            if self.cls_id is not None:
                ids = [self.cls_id] + ids
            if self.eos_id is not None:
                ids = ids + [self.eos_id]
            rows.append(ids)
        length = max(1, max(len(r) for r in rows))
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = 1
        return input_ids, mask

    def embed_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        keep = attention_mask.clone().to(hidden.dtype)
        if self.cls_id is not None:
            keep = keep * (input_ids != self.cls_id).to(hidden.dtype)
        if self.eos_id is not None:
            keep = keep * (input_ids != self.eos_id).to(hidden.dtype)
        denom = keep.sum(dim=1, keepdim=True)
        pooled = (hidden * keep.unsqueeze(-1)).sum(dim=1) / denom.clamp(min=1.0)
        return pooled.float()

    def forward(self, counts: np.ndarray | torch.Tensor, genes: Sequence[str] | None = None) -> torch.Tensor:  # type: ignore[override]
        ids, mask = self.tokenize(counts, genes)
        return self.embed_ids(ids, mask)


__all__ = ["TimmViTEncoder", "ConchAttentionalPooler", "ConchVisual", "ConchEncoder", "HFViTEncoder",
           "OpenClipVisualEncoder", "GeneformerEncoder"]
