"""Frozen encoders from local weights: a small registry in the spirit of ``timm.create_model``.

An encoder is a :class:`torch.nn.Module` with a ``.spec`` (:class:`EncoderSpec`). Image encoders
take uint8 tiles ``(B, H, W, 3)`` or ``(B, 3, H, W)`` and return ``(B, D)`` float embeddings; the
scaling to [0, 1], the resize to the encoder's input size and the mean/std normalisation happen
inside. Expression encoders (Geneformer) take a count matrix ``(B, G)`` plus the gene names.

Nothing is downloaded: weights are local files named in config (``encoders: {name: {weights:
path}}``); ``pretrained=True`` / hub ids are never used. Supported weight formats:

* ``safetensors``: a ``*.safetensors`` file (or a sharded ``model.safetensors.index.json`` dir);
* ``torch``: a state dict in ``*.pt|*.pth|*.bin|*.ckpt`` read with ``torch.load(weights_only=True)``
  (a training checkpoint holding the state dict under ``state_dict``/``model`` is accepted too;
  a leading ``module.`` from DDP is removed);
* ``hf_dir``: a directory as the Hugging Face hub ships it (``config.json`` + ``model.safetensors``
  or ``pytorch_model.bin``; open_clip's ``open_clip_model.safetensors`` /
  ``open_clip_pytorch_model.bin`` for Loki).

Adding an encoder is one :func:`register_encoder` call plus ``encoders: {name: {weights: path}}``
in ``config/config.yaml``.

Architectures matched (see ``list_encoders_table()``):

* ``vit_s``   timm ``vit_small_patch16_224`` (384-d CLS), mean = std = 0.5 as in the paper's code;
  weights optional: without them a seeded random init (``random-init:seed=N``) gives the same
  features on every run. Geometry (``embed_dim``, ``depth``, ``num_heads``) comes from
  ``model.vit`` in config so the demo's reduced ViT is the same network everywhere.
* ``uni``     UNI: ``timm.create_model("vit_large_patch16_224", img_size=224, patch_size=16,
  init_values=1e-5, num_classes=0, dynamic_img_size=True)``; ImageNet mean/std; CLS (1024-d).
* ``uni2h``   UNI2-h: ``timm.create_model("vit_giant_patch14_224", img_size=224, patch_size=14,
  depth=24, num_heads=24, init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667*2, num_classes=0,
  no_embed_class=True, mlp_layer=SwiGLUPacked, act_layer=SiLU, reg_tokens=8,
  dynamic_img_size=True)``; ImageNet mean/std; CLS (1536-d).
* ``phikon``  Phikon: transformers ``ViTModel`` ViT-B/16 (``add_pooling_layer=False``) from a local
  HF dir; ImageNet mean/std; CLS of ``last_hidden_state`` (768-d).
* ``phikon2`` Phikon-v2: transformers ``Dinov2Model`` ViT-L/16 from a local HF dir; CLS (1024-d).
  Table A.3 of the paper lists "phikon" with 303M parameters and a 1024-d embedding, i.e. this
  model; ``phikon`` (ViT-B, 86M, 768-d) is the original Phikon.
  transformers >= 5 renamed module parameters; HF checkpoints (either layout) are loaded through
  transformers' own ``from_pretrained(None, config=..., state_dict=...)`` conversion, with every
  missing/unexpected/mismatched key turned into an InputError.
* ``loki``    OmiCLIP/Loki: the image tower of open_clip ``coca_ViT-L-14`` (built by open_clip's
  own ``_build_vision_tower`` from the ``coca_ViT-L-14`` model config, i.e. exactly
  ``open_clip.create_model('coca_ViT-L-14', pretrained=None).visual`` without building the
  text towers); OpenAI CLIP mean/std; the attention-pooled, projected image latent (768-d,
  not L2-normalised). Checkpoint keys ``visual.*`` (text/decoder keys are ignored).
* ``conch``   CONCH v1 image tower: timm ViT-B/16 trunk (img_size 448, num_classes 0,
  dynamic_img_size) run to ``forward_features`` + CONCH's ``VisualModel`` head:
  ``attn_pool_contrast`` (1 query, 8 heads, d_model 512, context 768, ``ln_q``/``ln_k``),
  ``ln_contrast`` and ``proj_contrast`` (512x512). Embedding = ``encode_image(proj_contrast=False,
  normalize=False)`` (512-d). Keys follow CONCH's ``pytorch_model.bin`` (``visual.trunk.*``,
  ``visual.attn_pool_contrast.*``...); the captioning pooler (``attn_pool_caption``/``ln_caption``)
  and text tower keys are ignored. OpenAI CLIP mean/std; tiles are 224 px, the 448-px position
  grid is interpolated by timm's dynamic_img_size (CONCH itself resizes to 448: set override
  ``input_size: 448`` to match exactly).
* ``geneformer`` Geneformer (expression): transformers ``BertModel`` over rank-value gene tokens
  from a local directory holding ``config.json``, ``model.safetensors`` or ``pytorch_model.bin``,
  ``token_dictionary.json`` (Ensembl id -> token id, incl. ``<pad>`` and, for V2 models,
  ``<cls>``/``<eos>``), ``gene_median_dictionary.json`` (Ensembl id -> median normalisation
  factor) and optionally ``gene_name_id_dict.json`` (gene symbol -> Ensembl id). The ``.pkl``
  dictionaries Geneformer ships are read with a restricted unpickler (plain dicts, str, int,
  float and NumPy scalars only). Embedding = mean of the last hidden state over gene tokens.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("encoders")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

FORMATS = ("safetensors", "torch", "hf_dir")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
DEFAULT_SEED = 0


# --------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder is, what it expects, and how to build it."""

    name: str
    kind: str  # "image" | "expression"
    architecture: str
    weight_formats: tuple[str, ...]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int
    pooling: str
    requires_weights: bool
    builder: Callable[..., Encoder]
    poolings: tuple[str, ...] = ("cls",)
    weight_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("image", "expression"):
            raise ValueError(f"encoder {self.name}: kind must be image|expression, not {self.kind}")
        bad = set(self.weight_formats) - set(FORMATS)
        if bad:
            raise ValueError(f"encoder {self.name}: unknown weight formats {sorted(bad)}")
        if self.pooling not in self.poolings:
            raise ValueError(f"encoder {self.name}: pooling {self.pooling} not in {self.poolings}")


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec, *, overwrite: bool = False) -> EncoderSpec:
    """Add ``spec`` to the registry (``overwrite=True`` replaces an existing entry)."""
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"encoder {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_encoders() -> list[EncoderSpec]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_spec(name: str) -> EncoderSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(
            f"unknown encoder {name!r}", field="encoders", expected=f"one of {sorted(_REGISTRY)}"
        ) from None


def encoder_kind(name: str) -> str:
    return get_spec(name).kind


def list_encoders_table(configured: Mapping[str, Any] | None = None) -> str:
    """A plain-text table of the registry (``morphomol encoders``).

    ``configured`` is the ``encoders`` config section; the last column shows the weights path set
    there (or whether the encoder can run without weights).
    """
    configured = configured or {}
    header = ("name", "kind", "architecture", "dim", "input", "pooling", "weights", "formats", "configured")
    rows = [header]
    for s in list_encoders():
        entry = configured.get(s.name) or {}
        path = entry.get("weights") if isinstance(entry, Mapping) else None
        if path:
            conf = f"{path}" + ("" if Path(path).exists() else " (missing)")
        else:
            conf = "-" if s.requires_weights else "random-init"
        rows.append(
            (
                s.name,
                s.kind,
                s.architecture,
                str(s.embed_dim),
                str(s.input_size) if s.kind == "image" else "genes",
                s.pooling,
                "required" if s.requires_weights else "optional",
                ",".join(s.weight_formats),
                conf,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ weight files


def _hash_file(path: Path, h: Any) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)


def weights_sha256(path: str | Path) -> str:
    """sha256 of a weights file; for a directory, of its regular files (names + contents, sorted)."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")):
            h.update(str(f.relative_to(p)).encode())
            h.update(b"\0")
            _hash_file(f, h)
    else:
        _hash_file(p, h)
    return h.hexdigest()


def _format_of(path: Path) -> str:
    if path.is_dir():
        return "hf_dir"
    if path.name.endswith(".safetensors"):
        return "safetensors"
    if path.suffix in TORCH_SUFFIXES:
        return "torch"
    return "unknown"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ...
        raise InputError(
            f"cannot read safetensors weights ({type(exc).__name__}: {exc}); the file may be "
            "truncated or corrupt",
            file=path,
            field="weights",
            expected="a complete .safetensors file",
        ) from None


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(
            f"refusing to load: not a plain state dict under torch.load(weights_only=True) ({exc})",
            file=path,
            field="weights",
            expected="a tensor-only state dict (.pt/.bin) or a .safetensors file",
        ) from None
    except Exception as exc:
        raise InputError(
            f"cannot read torch weights ({type(exc).__name__}: {exc}); the file may be truncated "
            "or corrupt",
            file=path,
            field="weights",
            expected="a state dict saved with torch.save",
        ) from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "module", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(
            "file does not hold a state dict (mapping of parameter names to tensors)",
            file=path,
            field="weights",
            expected="a state dict, or a checkpoint with one under 'state_dict'",
        )
    return dict(obj)


def _resolve_dir_file(path: Path, names: Sequence[str]) -> Path:
    for name in names:
        cand = path / name
        if cand.is_file():
            return cand
        index = path / f"{name}.index.json"
        if index.is_file():
            return index
    raise InputError(
        "weights directory holds no weights file",
        file=path,
        field="weights",
        expected="one of " + ", ".join(names),
    )


def read_state_dict(path: str | Path, spec: EncoderSpec | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors file, a torch state dict or an HF-style directory."""
    p = Path(path)
    formats = spec.weight_formats if spec is not None else FORMATS
    names = spec.weight_files if spec is not None else ("model.safetensors", "pytorch_model.bin")
    expected = _expected_text(spec) if spec is not None else "a .safetensors, .pt/.bin file or an HF directory"
    if not p.exists():
        raise InputError("weights not found", file=p, field="weights", expected=expected)
    fmt = _format_of(p)
    if fmt not in formats:
        raise InputError(f"unsupported weights format '{fmt}'", file=p, field="weights", expected=expected)
    if fmt == "hf_dir":
        p = _resolve_dir_file(p, names)
    if p.name.endswith(".index.json"):
        try:
            index = json.loads(p.read_text())
            shards = sorted(set(index["weight_map"].values()))
        except Exception as exc:
            raise InputError(f"unreadable shard index ({exc})", file=p, field="weight_map") from None
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(read_state_dict(p.parent / shard))
        return out
    if p.name.endswith(".safetensors"):
        return _read_safetensors(p)
    return _read_torch(p)


def _expected_text(spec: EncoderSpec) -> str:
    parts = []
    if "safetensors" in spec.weight_formats:
        parts.append("a .safetensors file")
    if "torch" in spec.weight_formats:
        parts.append("a torch state dict (.pt/.pth/.bin)")
    if "hf_dir" in spec.weight_formats:
        parts.append("a directory with " + " or ".join(spec.weight_files))
    return f"for encoder '{spec.name}': " + ", or ".join(parts)


def _first(items: Iterable[str], n: int = 5) -> str:
    items = list(items)
    head = ", ".join(items[:n])
    return head + (f", ... ({len(items)} in all)" if len(items) > n else "")


def adapt_state_dict(
    sd: Mapping[str, torch.Tensor],
    *,
    select_prefix: Sequence[str] = (),
    ignore_prefixes: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Strip a DDP ``module.`` prefix, keep only keys under the first ``select_prefix`` present
    (e.g. ``visual.`` of a full CLIP checkpoint, with the prefix removed) and drop ignored keys."""
    out = dict(sd)
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module.") :]: v for k, v in out.items()}
    for prefix in select_prefix:
        if any(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items() if k.startswith(prefix)}
            break
    if ignore_prefixes:
        out = {k: v for k, v in out.items() if not any(k.startswith(p) for p in ignore_prefixes)}
    return out


def load_weights_into(
    module: nn.Module,
    sd: Mapping[str, torch.Tensor],
    *,
    source: str | Path,
    encoder: str,
) -> None:
    """Strictly load ``sd`` into ``module``; any missing/unexpected key or shape mismatch is an
    :class:`InputError` naming the file and the first few offending keys."""
    target = module.state_dict()
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    mismatched = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in sd and tuple(sd[k].shape) != tuple(target[k].shape)
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys: {_first(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_first(unexpected)}")
        if mismatched:
            problems.append(f"mismatched shapes: {_first(mismatched, 3)}")
        raise InputError(
            f"weights do not fit encoder '{encoder}' ({'; '.join(problems)})",
            file=source,
            field="weights",
            expected=f"a state dict of the '{encoder}' architecture with the configured geometry",
        )
    with torch.no_grad():
        module.load_state_dict({k: sd[k].to(target[k].dtype) for k in target}, strict=True)


# --------------------------------------------------------------------------------- encoders


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


def _pool_tokens(tokens: torch.Tensor, n_prefix: int, pooling: str) -> torch.Tensor:
    cls = tokens[:, 0]
    mean = tokens[:, n_prefix:].mean(dim=1)
    if pooling == "cls":
        return cls
    if pooling == "mean":
        return mean
    return torch.cat([cls, mean], dim=-1)


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
        return _pool_tokens(tokens, int(self.model.num_prefix_tokens), self.pooling)

    def forward_tokens(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        tokens = self.model.forward_features(self.preprocess(images))
        return tokens[:, int(self.model.num_prefix_tokens) :]


class _ConchAttentionalPooler(nn.Module):
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


class _ConchVisual(nn.Module):
    def __init__(self, trunk: nn.Module, embed_dim: int, heads: int) -> None:
        super().__init__()
        self.trunk = trunk
        width = int(trunk.num_features)
        self.attn_pool_contrast = _ConchAttentionalPooler(embed_dim, width, heads, 1)
        self.ln_contrast = nn.LayerNorm(embed_dim)
        self.proj_contrast = nn.Parameter(width**-0.5 * torch.randn(embed_dim, embed_dim))


class ConchEncoder(Encoder):
    def __init__(self, spec: EncoderSpec, model: _ConchVisual, **kw: Any) -> None:
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


class HFViTEncoder(Encoder):
    def __init__(self, spec: EncoderSpec, model: nn.Module, **kw: Any) -> None:
        super().__init__(spec, **kw)
        self.model = model
        width = int(model.config.hidden_size)
        self.dim = 2 * width if self.pooling == "cls+mean" else width

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.model(pixel_values=x).last_hidden_state
        return _pool_tokens(hidden, 1, self.pooling)

    def forward_tokens(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        return self.model(pixel_values=self.preprocess(images)).last_hidden_state[:, 1:]


class OpenClipVisualEncoder(Encoder):
    def __init__(self, spec: EncoderSpec, model: nn.Module, out_dim: int, **kw: Any) -> None:
        super().__init__(spec, **kw)
        self.model = model
        self.dim = int(out_dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        pooled = out[0] if isinstance(out, tuple) else out
        return pooled


# ------------------------------------------------------------------------------- geneformer


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler for Geneformer's dictionaries: containers, str/int/float and NumPy scalars only."""

    ALLOWED = {
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            import importlib

            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _read_dict_file(directory: Path, stems: Sequence[str], *, required: bool) -> dict[str, Any] | None:
    for stem in stems:
        for suffix in (".json", ".pkl", ".pickle"):
            p = directory / f"{stem}{suffix}"
            if not p.is_file():
                continue
            try:
                if suffix == ".json":
                    obj = json.loads(p.read_text())
                else:
                    with open(p, "rb") as f:
                        obj = _SafeUnpickler(f).load()
            except Exception as exc:
                raise InputError(f"cannot read dictionary ({type(exc).__name__}: {exc})", file=p,
                                 expected="a JSON object (or plain-dict pickle)") from None
            if not isinstance(obj, dict):
                raise InputError("not a dictionary", file=p, expected="a JSON object") from None
            return obj
    if required:
        raise InputError(
            "Geneformer directory lacks a dictionary file",
            file=directory,
            field=stems[0],
            expected=f"{stems[0]}.json (or .pkl) in the weights directory",
        )
    return None


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


# ---------------------------------------------------------------------------------- builders


def _build_random(fn: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _split_overrides(spec: EncoderSpec, overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate encoder-level options (pooling, input_size, seed...) from architecture kwargs."""
    enc_keys = {"pooling", "input_size", "seed", "max_input_size", "target_sum", "weights",
                "batch_size", "overrides", "kind"}
    arch = {**dict(spec.defaults), **{k: v for k, v in overrides.items() if k not in enc_keys}}
    enc = {k: v for k, v in overrides.items() if k in enc_keys}
    return arch, enc


def _weights_id(weights: Path | None, seed: int) -> str:
    return weights_sha256(weights) if weights is not None else f"random-init:seed={seed}"


def _timm_builder(model_name: str, *, select_prefix: Sequence[str] = (), ignore: Sequence[str] = ("head.", "fc_norm.")) -> Callable[..., Encoder]:
    def build(spec: EncoderSpec, weights: Path | None, overrides: Mapping[str, Any], seed: int) -> Encoder:
        import timm

        arch, enc = _split_overrides(spec, overrides)
        kwargs = dict(arch)
        for key in ("mlp_layer", "act_layer"):
            if isinstance(kwargs.get(key), str):
                kwargs[key] = _resolve_layer(kwargs[key])
        kwargs.setdefault("num_classes", 0)
        kwargs["global_pool"] = "token"
        sd = None
        if weights is not None:  # read (and validate) the file before building a large model
            sd = adapt_state_dict(read_state_dict(weights, spec), select_prefix=select_prefix, ignore_prefixes=ignore)
        try:
            model = _build_random(lambda: timm.create_model(model_name, pretrained=False, **kwargs), seed)
        except (TypeError, AssertionError, ValueError) as exc:
            raise InputError(f"cannot build {model_name} with {arch}: {exc}", field=f"encoders.{spec.name}.overrides") from None
        if sd is not None:
            load_weights_into(model, sd, source=weights, encoder=spec.name)
        return TimmViTEncoder(spec, model, config={**enc, "arch": _jsonable(arch)}, weights_id=_weights_id(weights, seed))

    return build


def _resolve_layer(name: str) -> Any:
    import timm.layers

    if name == "SwiGLUPacked":
        return timm.layers.SwiGLUPacked
    if name == "SiLU":
        return nn.SiLU
    if name == "GELU":
        return nn.GELU
    raise InputError(f"unknown layer '{name}'", field="overrides", expected="SwiGLUPacked|SiLU|GELU")


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, (str, int, float, bool, type(None))):
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = list(v)
        else:
            out[k] = getattr(v, "__name__", str(v))
    return out


def _build_conch(spec: EncoderSpec, weights: Path | None, overrides: Mapping[str, Any], seed: int) -> Encoder:
    import timm

    arch, enc = _split_overrides(spec, overrides)
    arch = dict(arch)
    embed_dim = int(arch.pop("contrast_dim", 512))
    heads = int(arch.pop("attn_pooler_heads", 8))
    trunk_kwargs = dict(arch)
    trunk_kwargs.update(num_classes=0, global_pool="token", dynamic_img_size=True)

    def make() -> nn.Module:
        trunk = timm.create_model("vit_base_patch16_224", pretrained=False, **trunk_kwargs)
        return _ConchVisual(trunk, embed_dim, heads)

    sd = None
    if weights is not None:
        sd = adapt_state_dict(
            read_state_dict(weights, spec),
            select_prefix=("visual.",),
            ignore_prefixes=("attn_pool_caption.", "ln_caption.", "head.", "trunk.head.", "trunk.fc_norm."),
        )
    model = _build_random(make, seed)
    if sd is not None:
        load_weights_into(model, sd, source=weights, encoder=spec.name)
    return ConchEncoder(spec, model, config={**enc, "arch": _jsonable({**arch, "contrast_dim": embed_dim})},
                        weights_id=_weights_id(weights, seed))


def _hf_offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _read_hf_config(directory: Path, cls: Any, name: str) -> Any:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise InputError("HF weights directory lacks config.json", file=directory, field="weights",
                         expected=f"config.json + model.safetensors (or pytorch_model.bin) for encoder '{name}'")
    try:
        return cls.from_json_file(str(cfg_path))
    except Exception as exc:
        raise InputError(f"unreadable config.json ({exc})", file=cfg_path, expected="a transformers config") from None


def _hf_from_state_dict(model_cls: Any, config: Any, sd: dict[str, torch.Tensor] | None, *, source: Path | None,
                        encoder: str, seed: int, **kwargs: Any) -> nn.Module:
    """Build a transformers model, random (seeded) or from ``sd`` through transformers' own loader,
    which maps legacy checkpoint key layouts (``encoder.layer.N.attention.attention.query``...)
    onto the current module names; any missing/unexpected/mismatched key is an InputError."""
    if sd is None:
        return _build_random(lambda: model_cls(config, **kwargs), seed)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, info = model_cls.from_pretrained(None, config=config, state_dict=sd, output_loading_info=True,
                                                ignore_mismatched_sizes=True, **kwargs)
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing keys: {_first(sorted(info['missing_keys']))}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected keys: {_first(sorted(info['unexpected_keys']))}")
    if info.get("mismatched_keys"):
        mm = [f"{k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in sorted(info["mismatched_keys"], key=str)]
        problems.append(f"mismatched shapes: {_first(mm, 3)}")
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


def _hf_vision_builder(config_name: str, model_name: str, *, pooler: bool) -> Callable[..., Encoder]:
    """transformers vision backbone (ViTModel / Dinov2Model) from a local HF dir or a weights file
    (geometry then from the spec defaults + overrides)."""

    def build(spec: EncoderSpec, weights: Path | None, overrides: Mapping[str, Any], seed: int) -> Encoder:
        _hf_offline()
        import transformers

        config_cls = getattr(transformers, config_name)
        model_cls = getattr(transformers, model_name)
        arch, enc = _split_overrides(spec, overrides)
        if weights is not None and weights.is_dir():
            config = _read_hf_config(weights, config_cls, spec.name)
        else:
            config = config_cls(**arch)
        kwargs = {"add_pooling_layer": False} if pooler else {}
        sd = None
        if weights is not None:
            sd = adapt_state_dict(read_state_dict(weights, spec), select_prefix=("vit.", "dinov2."),
                                  ignore_prefixes=("pooler.", "classifier."))
        model = _hf_from_state_dict(model_cls, config, sd, source=weights, encoder=spec.name, seed=seed, **kwargs)
        return HFViTEncoder(spec, model, config={**enc, "arch": _jsonable(config.to_diff_dict())},
                            weights_id=_weights_id(weights, seed))

    return build


def _build_loki(spec: EncoderSpec, weights: Path | None, overrides: Mapping[str, Any], seed: int) -> Encoder:
    import open_clip
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    arch, enc = _split_overrides(spec, overrides)
    cfg = copy.deepcopy(open_clip.get_model_config("coca_ViT-L-14"))
    if cfg is None:  # pragma: no cover - open_clip without its bundled configs
        raise InputError("open_clip has no 'coca_ViT-L-14' config", field="loki")
    embed_dim = int(arch.pop("embed_dim", cfg["embed_dim"]))
    vision = dict(cfg["vision_cfg"])
    vision.update(arch.pop("vision_cfg", {}) or {})
    fields = set(CLIPVisionCfg.__dataclass_fields__)
    for k in list(arch):
        if k in fields:
            vision[k] = arch.pop(k)
    if arch:
        raise InputError(f"unknown overrides {sorted(arch)}", field="encoders.loki.overrides",
                         expected=f"embed_dim or CLIPVisionCfg fields {sorted(fields)}")
    quick_gelu = bool(cfg.get("quick_gelu", False))
    sd = None
    if weights is not None:
        sd = adapt_state_dict(read_state_dict(weights, spec), select_prefix=("visual.",))
    model = _build_random(lambda: _build_vision_tower(embed_dim, CLIPVisionCfg(**vision), quick_gelu, None), seed)
    enc.setdefault("input_size", int(vision.get("image_size", 224)))
    if sd is not None:
        load_weights_into(model, sd, source=weights, encoder=spec.name)
    return OpenClipVisualEncoder(spec, model, embed_dim, config={**enc, "arch": {"embed_dim": embed_dim, "vision_cfg": _jsonable(vision)}},
                                 weights_id=_weights_id(weights, seed))


def _build_geneformer(spec: EncoderSpec, weights: Path | None, overrides: Mapping[str, Any], seed: int) -> GeneformerEncoder:
    _hf_offline()
    from transformers import BertConfig, BertModel

    arch, enc = _split_overrides(spec, overrides)
    if weights is None or not Path(weights).is_dir():
        raise InputError(
            "Geneformer needs a local model directory",
            file=weights,
            field="encoders.geneformer.weights",
            expected="a directory with config.json, model.safetensors|pytorch_model.bin, "
            "token_dictionary.json, gene_median_dictionary.json (+ optional gene_name_id_dict.json)",
        )
    if not weights.exists():
        raise InputError("weights not found", file=weights, field="weights", expected=_expected_text(spec))
    config = _read_hf_config(weights, BertConfig, spec.name)
    token_dict = _read_dict_file(weights, ("token_dictionary",), required=True)
    medians = _read_dict_file(weights, ("gene_median_dictionary",), required=True)
    names = _read_dict_file(weights, ("gene_name_id_dict",), required=False)
    sd = adapt_state_dict(read_state_dict(weights, spec), select_prefix=("bert.",),
                          ignore_prefixes=("pooler.", "cls.", "classifier."))
    sd.pop("embeddings.position_ids", None)
    model = _hf_from_state_dict(BertModel, config, sd, source=weights, encoder=spec.name, seed=seed,
                                add_pooling_layer=False)
    assert token_dict is not None and medians is not None
    return GeneformerEncoder(spec, model, token_dict, medians, names, config=enc, weights_id=_weights_id(weights, seed))


# --------------------------------------------------------------------------------- registry


register_encoder(EncoderSpec(
    name="vit_s", kind="image", architecture="timm vit_small_patch16_224",
    weight_formats=FORMATS, input_size=224, mean=HALF, std=HALF, embed_dim=384,
    pooling="cls", poolings=("cls", "mean", "cls+mean"), requires_weights=False,
    builder=_timm_builder("vit_small_patch16_224"),
    defaults={"embed_dim": 384, "depth": 12, "num_heads": 6},
    description="ViT-S/16 (paper's morph encoder); random init with a fixed seed when no weights",
))
register_encoder(EncoderSpec(
    name="uni", kind="image", architecture="timm vit_large_patch16_224 (UNI)",
    weight_formats=FORMATS, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, embed_dim=1024,
    pooling="cls", poolings=("cls", "mean", "cls+mean"), requires_weights=True,
    builder=_timm_builder("vit_large_patch16_224"),
    defaults={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
    description="UNI ViT-L/16",
))
register_encoder(EncoderSpec(
    name="uni2h", kind="image", architecture="timm vit_giant_patch14_224 as ViT-H/14+8reg SwiGLU (UNI2-h)",
    weight_formats=FORMATS, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, embed_dim=1536,
    pooling="cls", poolings=("cls", "mean", "cls+mean"), requires_weights=True,
    builder=_timm_builder("vit_giant_patch14_224"),
    defaults={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
              "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True,
              "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU", "reg_tokens": 8, "dynamic_img_size": True},
    description="UNI2-h ViT-H/14 with 8 register tokens",
))
register_encoder(EncoderSpec(
    name="conch", kind="image", architecture="CONCH v1 visual: timm vit_base_patch16_224 + attentional pooler",
    weight_formats=FORMATS, input_size=224, mean=CLIP_MEAN, std=CLIP_STD, embed_dim=512,
    pooling="attn", poolings=("attn", "proj"), requires_weights=True, builder=_build_conch,
    defaults={"img_size": 448, "patch_size": 16, "contrast_dim": 512, "attn_pooler_heads": 8},
    description="CONCH ViT-B/16 image tower, encode_image(proj_contrast=False)",
))
register_encoder(EncoderSpec(
    name="phikon", kind="image", architecture="transformers ViTModel ViT-B/16 (Phikon)",
    weight_formats=FORMATS, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, embed_dim=768,
    pooling="cls", poolings=("cls", "mean", "cls+mean"), requires_weights=True,
    builder=_hf_vision_builder("ViTConfig", "ViTModel", pooler=True),
    defaults={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
              "intermediate_size": 3072, "image_size": 224, "patch_size": 16, "qkv_bias": True},
    description="Phikon ViT-B/16 (iBOT)",
))
register_encoder(EncoderSpec(
    name="phikon2", kind="image", architecture="transformers Dinov2Model ViT-L/16 (Phikon-v2)",
    weight_formats=FORMATS, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, embed_dim=1024,
    pooling="cls", poolings=("cls", "mean", "cls+mean"), requires_weights=True,
    builder=_hf_vision_builder("Dinov2Config", "Dinov2Model", pooler=False),
    defaults={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
              "mlp_ratio": 4, "image_size": 224, "patch_size": 16, "layerscale_value": 1e-5},
    description="Phikon-v2 ViT-L/16 (DINOv2); Table A.3's 303M-parameter, 1024-d 'phikon'",
))
register_encoder(EncoderSpec(
    name="loki", kind="image", architecture="open_clip coca_ViT-L-14 image tower (OmiCLIP/Loki)",
    weight_formats=FORMATS, input_size=224, mean=CLIP_MEAN, std=CLIP_STD, embed_dim=768,
    pooling="latent", poolings=("latent",), requires_weights=True, builder=_build_loki,
    weight_files=("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors",
                  "pytorch_model.bin", "checkpoint.pt"),
    description="Loki/OmiCLIP image encoder (CoCa ViT-L/14 visual)",
))
register_encoder(EncoderSpec(
    name="geneformer", kind="expression", architecture="transformers BertModel over rank-value gene tokens (Geneformer)",
    weight_formats=("hf_dir",), input_size=0, mean=HALF, std=HALF, embed_dim=512,
    pooling="mean", poolings=("mean",), requires_weights=True, builder=_build_geneformer,
    description="Geneformer (e.g. gf-12L-38M-i4096), mean over gene tokens",
))


# ---------------------------------------------------------------------------------- factory


def create_encoder(
    name: str,
    weights: str | Path | None = None,
    *,
    allow_random: bool | None = None,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> Encoder | GeneformerEncoder:
    """Build encoder ``name`` (frozen, eval mode), loading ``weights`` when given.

    ``overrides`` change the architecture (e.g. ``embed_dim``/``depth``/``num_heads`` of ``vit_s``)
    or encoder options (``pooling``, ``input_size``, ``seed``). Encoders with
    ``requires_weights`` refuse to build without weights unless ``allow_random=True`` (tests,
    benchmarks). Random init is seeded (``seed``, default 0), so it is identical on every run.
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
            expected=_expected_text(spec) + f" (set encoders: {{{name}: {{weights: PATH}}}} in config/config.yaml)",
        )
    if wpath is not None and not wpath.exists():
        raise InputError("weights not found", file=wpath, field=f"encoders.{name}.weights", expected=_expected_text(spec))
    if wpath is not None and _format_of(wpath) not in spec.weight_formats:
        raise InputError(f"unsupported weights format '{_format_of(wpath)}'", file=wpath,
                         field=f"encoders.{name}.weights", expected=_expected_text(spec))
    enc = spec.builder(spec, wpath, overrides, seed)
    enc.freeze()
    if device is not None:
        enc.to(device)
    log.info("encoder %s: %s, dim %d, weights %s", name, spec.architecture, enc.dim, enc.weights_id[:24])
    return enc


def save_weights(encoder: nn.Module, path: str | Path) -> Path:
    """Save an encoder's weights in the format implied by ``path``: ``*.safetensors``, a torch
    state dict (``*.pt|*.pth|*.bin``) or, for a path without suffix, an HF-style directory
    (``config.json`` + ``model.safetensors``; transformers models use ``save_pretrained``)."""
    from safetensors.torch import save_file

    p = Path(path)
    model = getattr(encoder, "model", encoder)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if p.name.endswith(".safetensors"):
        p.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(p))
    elif p.suffix in TORCH_SUFFIXES:
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.save(sd, str(p))
    else:
        p.mkdir(parents=True, exist_ok=True)
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(str(p), safe_serialization=True)
        else:
            save_file(sd, str(p / "model.safetensors"))
            meta = {"encoder": getattr(getattr(encoder, "spec", None), "name", None), **getattr(encoder, "config", {})}
            (p / "config.json").write_text(json.dumps(meta, indent=1, default=str))
    return p


def encoder_dim(encoder: nn.Module) -> int:
    return int(getattr(encoder, "dim"))


__all__ = [
    "EncoderSpec", "Encoder", "GeneformerEncoder", "register_encoder", "list_encoders", "get_spec",
    "encoder_kind", "create_encoder", "list_encoders_table", "read_state_dict", "adapt_state_dict",
    "load_weights_into", "weights_sha256", "save_weights", "IMAGENET_MEAN", "IMAGENET_STD",
    "CLIP_MEAN", "CLIP_STD",
]
