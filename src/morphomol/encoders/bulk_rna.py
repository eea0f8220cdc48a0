"""Bulk-RNA foundation models (``bulkrnabert``): an expression encoder over a fixed gene vocabulary.

The architecture of BulkRNABert (Gélard et al. 2024): every gene of the model's vocabulary is one
token; its value is ``log10(1 + TPM)`` cut into ``n_bins`` equal bins over ``[0, max_value]``; a
token's embedding is the learned embedding of its bin plus the learned embedding of its gene
(position); a transformer encoder (pre-norm, GELU) runs over all genes; the sample embedding is the
mean of the last layer's gene tokens (after a final LayerNorm).

Local weights only (nothing is downloaded): a directory with

* ``config.json``: ``{"n_bins": 64, "max_value": 5.0, "embed_dim": 256, "depth": 4, "num_heads": 8,
  "ffn_dim": 512, "normalisation": "log10p1_tpm"}``;
* ``genes.txt``: the gene vocabulary (one symbol per line, in the model's token order);
* ``model.safetensors`` (or ``pytorch_model.bin``, read with ``weights_only``): keys
  ``gene_embedding.weight`` (G, D), ``bin_embedding.weight`` (n_bins, D), ``layers.layers.{i}.*``
  (``torch.nn.TransformerEncoder`` with ``batch_first``/``norm_first``), ``norm.weight``/``.bias``.

Input normalisation (documented, done inside): the encoder receives linear TPM-like values
(B, G_in) with their gene names (``set_genes``); genes of the vocabulary absent from the input are
0 TPM (their fraction is logged); input genes outside the vocabulary are ignored. InstaDeep's
published checkpoints are Haiku parameters: convert them to the key layout above first (not done
here). Torch-free at import.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from morphomol.encoders.registry import HALF, EncoderSpec, register_encoder
from morphomol.errors import InputError

CONFIG_KEYS = ("n_bins", "max_value", "embed_dim", "depth", "num_heads", "ffn_dim")


def read_bulk_config(directory: Path) -> dict[str, Any]:
    """``config.json`` + ``genes.txt`` of a bulk-RNA model directory (errors name the file)."""
    cfg_path, genes_path = directory / "config.json", directory / "genes.txt"
    if not cfg_path.is_file() or not genes_path.is_file():
        raise InputError("bulk-RNA model directory lacks config.json or genes.txt", file=directory,
                         field="encoders.bulkrnabert.weights",
                         expected="config.json, genes.txt and model.safetensors")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"invalid JSON ({exc})", file=cfg_path) from None
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    if missing:
        raise InputError(f"missing key(s) {missing}", file=cfg_path, field=missing[0],
                         expected="n_bins, max_value, embed_dim, depth, num_heads, ffn_dim")
    genes = [g.strip() for g in genes_path.read_text().splitlines() if g.strip()]
    if len(set(genes)) != len(genes) or not genes:
        raise InputError("empty or duplicate gene symbols", file=genes_path, expected="a unique gene vocabulary")
    return {**cfg, "genes": genes}


@register_encoder(
    name="bulkrnabert", kind="expression",
    architecture="transformer over binned log10(1+TPM) gene tokens (BulkRNABert layout)", model_name="BulkRNAEncoder",
    weight_formats=("hf_dir",), weight_files=("model.safetensors", "pytorch_model.bin"), input_size=0, mean=HALF,
    std=HALF, embed_dim=256, pooling="mean", poolings=("mean",), requires_weights=True,
    description="bulk-RNA foundation model from a local directory (config.json, genes.txt, model.safetensors)",
)
def build_bulk_rna(spec: EncoderSpec, weights: Path | None, overrides: Mapping[str, Any], seed: int, *,
                   overrides_field: str | None = None) -> Any:
    """The module of :mod:`.bulk_rna_module` from a local directory (required), strictly loaded."""
    from morphomol.encoders.bulk_rna_module import BulkRNAEncoder
    from morphomol.encoders.weights import load_weights_into, read_encoder_state_dict, weights_id

    if weights is None or not Path(weights).is_dir():
        raise InputError("bulkrnabert needs a local model directory", file=weights, field="encoders.bulkrnabert.weights",
                         expected="a directory with config.json, genes.txt, model.safetensors")
    cfg = read_bulk_config(Path(weights))
    enc = BulkRNAEncoder(spec, cfg, config={"normalisation": cfg.get("normalisation", "log10p1_tpm"),
                                            **{k: cfg[k] for k in CONFIG_KEYS}}, weights_id=weights_id(weights, seed))
    load_weights_into(enc.core, read_encoder_state_dict(weights, spec), source=weights, encoder=spec.name)
    return enc


def save_bulk_model(directory: str | Path, core_state: Mapping[str, Any], cfg: Mapping[str, Any],
                    genes: Sequence[str]) -> Path:
    """Write a model directory in the layout above (tests, conversions)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({k: cfg[k] for k in cfg if k != "genes"}, indent=2))
    (d / "genes.txt").write_text("\n".join(genes) + "\n")
    save_file({k: v.contiguous() for k, v in core_state.items()}, str(d / "model.safetensors"))
    return d
