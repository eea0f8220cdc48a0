"""Frozen encoders from local weights: a small registry in the spirit of ``timm.create_model``.

An encoder is a :class:`torch.nn.Module` with a ``.spec`` (:class:`EncoderSpec`). Image encoders
take uint8 tiles ``(B, H, W, 3)`` or ``(B, 3, H, W)`` and return ``(B, D)`` float embeddings; the
scaling to [0, 1], the resize to the encoder's input size and the mean/std normalisation happen
inside. Expression encoders (Geneformer) take a count matrix ``(B, G)`` plus the gene names.

Nothing is downloaded: weights are local files named in config (``encoders: {name: {weights:
path}}``); ``pretrained=True`` / hub ids are never used. Formats and key rules:
:mod:`morphomol.encoders.weights` (the one weight loader, also used by the fusion model's ViT).

Layout (importing this package, or :mod:`.registry`, does not import torch; Snakemake imports it
while building the DAG):

* :mod:`.registry`  :class:`EncoderSpec`, the :func:`register_encoder` decorator, look-ups;
* :mod:`.weights`   reading, key rules, strict loading, checksums, saving;
* :mod:`.base`      the :class:`Encoder` base class (normalisation, pooling) and builder helpers;
* one module per family, each registering its encoders on its builder: :mod:`.timm_vit`
  (``vit_s``, ``uni``, ``uni2h``), :mod:`.conch`, :mod:`.hf_vit` (``phikon``, ``phikon2``),
  :mod:`.loki`, :mod:`.geneformer`; their ``nn.Module`` classes live in :mod:`._modules`.

Adding an encoder is one ``@register_encoder(...)`` builder plus ``encoders: {name: {weights:
path}}`` in ``config/config.yaml``; ``morphomol encoders`` lists the registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

# the family modules register their encoders on import (torch-free)
from morphomol.encoders import bulk_rna, conch, geneformer, hf_vit, loki, timm_vit  # noqa: F401
from morphomol.encoders.registry import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_SEED,
    FORMATS,
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderSpec,
    encoder_kind,
    get_spec,
    list_encoders,
    list_encoders_table,
    register_encoder,
    unregister_encoder,
)
from morphomol.encoders.weights import (
    adapt_state_dict,
    check_weights_path,
    expected_text,
    load_timm_vit_weights,
    load_weights_into,
    read_state_dict,
    save_weights,
    weights_sha256,
)
from morphomol.errors import InputError
from morphomol.util.logs import get_logger

if TYPE_CHECKING:
    import torch
    from torch import nn

    from morphomol.encoders._modules import GeneformerEncoder
    from morphomol.encoders.base import Encoder

log = get_logger("encoders")

#: classes re-exported lazily (importing them imports torch)
_LAZY = {
    "Encoder": "morphomol.encoders.base",
    "TimmViTEncoder": "morphomol.encoders._modules",
    "ConchEncoder": "morphomol.encoders._modules",
    "HFViTEncoder": "morphomol.encoders._modules",
    "OpenClipVisualEncoder": "morphomol.encoders._modules",
    "GeneformerEncoder": "morphomol.encoders._modules",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create_encoder(
    name: str,
    weights: str | Path | None = None,
    *,
    allow_random: bool | None = None,
    device: str | torch.device | None = None,
    overrides_field: str | None = None,
    **overrides: Any,
) -> Encoder | GeneformerEncoder:
    """Build encoder ``name`` (frozen, eval mode), loading ``weights`` when given.

    ``overrides`` change the architecture (e.g. ``embed_dim``/``depth``/``num_heads`` of ``vit_s``)
    or encoder options (``pooling``, ``input_size``, ``seed``); a nested ``overrides={...}`` mapping
    is merged under them. Encoders with ``requires_weights`` refuse to build without weights unless
    ``allow_random=True`` (tests, benchmarks). Random init is seeded (``seed``, default 0), so it
    is identical on every run. ``overrides_field`` is the config key the overrides came from, named
    in errors about them (default ``encoders.<name>.overrides``; ``model.vit`` for the ``vit_s``
    geometry). Reads the weights file or directory.
    """
    spec = get_spec(name)
    overrides = dict(overrides)
    nested = overrides.pop("overrides", None)
    if isinstance(nested, Mapping):
        overrides = {**nested, **overrides}
    seed = int(overrides.get("seed", DEFAULT_SEED))
    wpath = Path(weights) if weights not in (None, "") else None
    if wpath is None and spec.requires_weights and not allow_random:
        raise InputError(
            f"encoder '{name}' needs pretrained weights and none are configured",
            field=f"encoders.{name}.weights",
            expected=expected_text(spec) + f" (set encoders: {{{name}: {{weights: PATH}}}} in config/config.yaml)",
        )
    if wpath is not None:
        check_weights_path(spec, wpath, field=f"encoders.{name}.weights")
    enc = spec.builder(spec, wpath, overrides, seed, overrides_field=overrides_field or f"encoders.{name}.overrides")
    enc.freeze()
    if device is not None:
        enc.to(device)
    log.info("encoder %s: %s, dim %d, weights %s", name, spec.architecture, enc.dim, enc.weights_id[:24])
    return enc


def encoder_dim(encoder: nn.Module) -> int:
    return int(getattr(encoder, "dim"))


__all__ = [
    "EncoderSpec", "Encoder", "GeneformerEncoder", "register_encoder", "unregister_encoder", "list_encoders",
    "get_spec", "encoder_kind", "create_encoder", "encoder_dim", "list_encoders_table", "read_state_dict",
    "adapt_state_dict", "load_weights_into", "load_timm_vit_weights", "weights_sha256", "save_weights",
    "IMAGENET_MEAN", "IMAGENET_STD", "CLIP_MEAN", "CLIP_STD", "HALF", "FORMATS",
]
