"""The image-encoder base class and the helpers every builder shares (imports torch).

Only builders import this module, when an encoder is created; the registry stays torch-free.

:class:`Encoder` takes uint8 tiles ``(B, H, W, 3)`` or ``(B, 3, H, W)`` (or floats in [0, 1]) and
returns ``(B, D)`` float embeddings: the scaling to [0, 1], the resize to the encoder's input size
and the mean/std normalisation happen inside. Subclasses implement :meth:`Encoder.embed` (and
:meth:`Encoder.forward_tokens` when they expose patch tokens).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from morphomol.encoders.registry import EncoderSpec
from morphomol.encoders.weights import first_items
from morphomol.errors import InputError

#: options of ``create_encoder(**overrides)`` that configure the encoder, not the architecture
ENCODER_OPTIONS = frozenset({"pooling", "input_size", "seed", "max_input_size", "target_sum", "weights",
                             "batch_size", "overrides", "kind"})


class Encoder(nn.Module):
    """Base class: normalisation inside, frozen (eval, no grad) after construction."""

    spec: EncoderSpec

    def __init__(self, spec: EncoderSpec, *, config: Mapping[str, Any], weights_id: str) -> None:
        super().__init__()
        self.spec = spec
        self.config = dict(config)
        self.weights_id = weights_id
        self.pooling = str(self.config.get("pooling", spec.pooling))
        if self.pooling not in spec.poolings:
            raise InputError(
                f"pooling '{self.pooling}' not available",
                field=f"encoders.{spec.name}.pooling",
                expected=f"one of {list(spec.poolings)}",
            )
        self.input_size = int(self.config.get("input_size", spec.input_size))
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.dim = 0

    def freeze(self) -> Encoder:
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def preprocess(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 (B,H,W,3)|(B,3,H,W) (or float in [0,1]) -> normalised float (B,3,S,S)."""
        x = torch.as_tensor(images)
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4:
            raise InputError(f"images must be 4-D, got shape {tuple(x.shape)}", field="images",
                             expected="(B,H,W,3) or (B,3,H,W)")
        if x.shape[1] != 3 and x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        elif x.shape[1] != 3:
            raise InputError(f"images have no RGB axis: shape {tuple(x.shape)}", field="images",
                             expected="(B,H,W,3) or (B,3,H,W)")
        x = x.to(device=self.mean.device)
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).div_(255.0)
        else:
            x = x.to(torch.float32)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:  # type: ignore[override]
        return self.embed(self.preprocess(images))

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # normalised input -> (B, D)
        raise NotImplementedError

    def forward_tokens(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        raise NotImplementedError(f"encoder '{self.spec.name}' does not expose patch tokens")

    @property
    def has_tokens(self) -> bool:
        return type(self).forward_tokens is not Encoder.forward_tokens


def pool_tokens(tokens: torch.Tensor, n_prefix: int, pooling: str) -> torch.Tensor:
    """``cls`` (token 0), ``mean`` (of the tokens after the ``n_prefix`` prefix tokens) or both."""
    cls = tokens[:, 0]
    mean = tokens[:, n_prefix:].mean(dim=1)
    if pooling == "cls":
        return cls
    if pooling == "mean":
        return mean
    return torch.cat([cls, mean], dim=-1)


# ---------------------------------------------------------------------------- builder helpers


def build_random(fn: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``fn()`` under a seeded, forked RNG: the same random init on every run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def split_overrides(spec: EncoderSpec, overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(architecture kwargs = spec defaults + overrides, encoder options such as pooling/seed)."""
    arch = {**dict(spec.defaults), **{k: v for k, v in overrides.items() if k not in ENCODER_OPTIONS}}
    enc = {k: v for k, v in overrides.items() if k in ENCODER_OPTIONS}
    return arch, enc


def jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    """A flat JSON-friendly copy (classes by name, anything else by ``str``) for store attrs."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (str, int, float, bool, type(None))):
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = list(v)
        else:
            out[k] = getattr(v, "__name__", str(v))
    return out


# ------------------------------------------------------------------------ transformers helpers


def hf_offline() -> None:
    """Make sure transformers / huggingface_hub never reach the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def read_hf_config(directory: Path, cls: Any, name: str) -> Any:
    """``cls.from_json_file(directory / 'config.json')``; InputError naming the directory."""
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise InputError("HF weights directory lacks config.json", file=directory, field="weights",
                         expected=f"config.json + model.safetensors (or pytorch_model.bin) for encoder '{name}'")
    try:
        return cls.from_json_file(str(cfg_path))
    except Exception as exc:
        raise InputError(f"unreadable config.json ({exc})", file=cfg_path, expected="a transformers config") from None


def hf_from_state_dict(model_cls: Any, config: Any, sd: dict[str, torch.Tensor] | None, *, source: Path | None,
                       encoder: str, seed: int, **kwargs: Any) -> nn.Module:
    """Build a transformers model, random (seeded) or from ``sd`` through transformers' own loader,
    which maps legacy checkpoint key layouts (``encoder.layer.N.attention.attention.query``...)
    onto the current module names; any missing/unexpected/mismatched key is an InputError."""
    if sd is None:
        return build_random(lambda: model_cls(config, **kwargs), seed)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, info = model_cls.from_pretrained(None, config=config, state_dict=sd, output_loading_info=True,
                                                ignore_mismatched_sizes=True, **kwargs)
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing keys: {first_items(sorted(info['missing_keys']))}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected keys: {first_items(sorted(info['unexpected_keys']))}")
    if info.get("mismatched_keys"):
        mm = [f"{k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in sorted(info["mismatched_keys"], key=str)]
        problems.append(f"mismatched shapes: {first_items(mm, 3)}")
    if info.get("error_msgs"):
        problems.append("; ".join(str(e) for e in info["error_msgs"][:3]))
    if problems:
        raise InputError(
            f"weights do not fit encoder '{encoder}' ({'; '.join(problems)})",
            file=source,
            field="weights",
            expected=f"a state dict of the '{encoder}' architecture matching its config.json",
        )
    return model.float().eval()


__all__ = ["Encoder", "pool_tokens", "build_random", "split_overrides", "jsonable", "hf_offline",
           "read_hf_config", "hf_from_state_dict", "ENCODER_OPTIONS"]
