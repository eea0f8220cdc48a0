"""The one weight loader: local weight files -> state dicts -> strictly loaded modules.

Used by every encoder builder and by the fusion model's trainable ViT
(:func:`load_timm_vit_weights`), so one ``encoders.vit_s.weights`` file loads identically for the
feature cache and for training. Nothing is downloaded. Formats:

* ``safetensors``: a ``*.safetensors`` file (or a sharded ``model.safetensors.index.json``);
* ``torch``: a state dict in ``*.pt|*.pth|*.bin|*.ckpt`` read with
  ``torch.load(weights_only=True)`` (never an arbitrary pickle); a training checkpoint holding the
  state dict under ``state_dict`` / ``model`` / ``module`` / ``model_state_dict`` is accepted;
* ``hf_dir``: a directory holding one of the spec's ``weight_files`` (``model.safetensors``,
  ``pytorch_model.bin``...), possibly sharded.

Key rules (:func:`adapt_state_dict`), in this order: while every key shares one wrapper prefix
(:data:`WRAPPER_PREFIXES`: DDP's ``module.``, Lightning's ``model.``, ``backbone.``,
``encoder.``, ``vit.``) it is stripped; then only the keys under the first of the spec's
``select_prefix`` present are kept (prefix removed); then the spec's ``ignore_prefixes`` are
dropped. Loading is strict (:func:`load_weights_into`): any missing or unexpected key or shape
mismatch is an :class:`InputError` naming the file and the first offending keys.

Importing this module does not import torch (the registry is torch-free); the functions do.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from morphomol.encoders.registry import FORMATS, HF_WEIGHT_FILES, TORCH_SUFFIXES, EncoderSpec, get_spec
from morphomol.errors import InputError
from morphomol.util.hashing import sha256_path

if TYPE_CHECKING:
    import torch
    from torch import nn

#: prefixes a wrapper (DDP, Lightning, a fine-tuning script) puts before every key
WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "vit.")


def weights_sha256(path: str | Path) -> str:
    """sha256 of a weights file; for a directory, of its regular files (names + contents, sorted)."""
    return sha256_path(path)


def weights_id(weights: Path | None, seed: int) -> str:
    """What an encoder records as its weights: the file's sha256, or ``random-init:seed=N``."""
    return weights_sha256(weights) if weights is not None else f"random-init:seed={seed}"


def format_of(path: Path) -> str:
    """``hf_dir`` | ``safetensors`` | ``torch`` | ``unknown`` from the path alone."""
    if path.is_dir():
        return "hf_dir"
    if path.name.endswith(".safetensors"):
        return "safetensors"
    if path.suffix in TORCH_SUFFIXES:
        return "torch"
    return "unknown"


def expected_text(spec: EncoderSpec) -> str:
    """The 'expected' part of a weights error: the formats ``spec`` accepts."""
    parts = []
    if "safetensors" in spec.weight_formats:
        parts.append("a .safetensors file")
    if "torch" in spec.weight_formats:
        parts.append("a torch state dict (.pt/.pth/.bin)")
    if "hf_dir" in spec.weight_formats:
        parts.append("a directory with " + " or ".join(spec.weight_files))
    return f"for encoder '{spec.name}': " + ", or ".join(parts)


def first_items(items: Iterable[str], n: int = 5) -> str:
    """The first ``n`` items, comma-separated, with the total when there are more."""
    items = list(items)
    head = ", ".join(items[:n])
    return head + (f", ... ({len(items)} in all)" if len(items) > n else "")


def check_weights_path(spec: EncoderSpec, path: str | Path, *, field: str) -> Path:
    """``path`` as a Path after checking it exists and has a format ``spec`` accepts."""
    p = Path(path)
    if not p.exists():
        raise InputError("weights not found", file=p, field=field, expected=expected_text(spec))
    if format_of(p) not in spec.weight_formats:
        raise InputError(f"unsupported weights format '{format_of(p)}'", file=p, field=field,
                         expected=expected_text(spec))
    return p


# ------------------------------------------------------------------------------- reading


def _read_safetensors(path: Path, field: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ...
        raise InputError(
            f"cannot read safetensors weights ({type(exc).__name__}: {exc}); the file may be "
            "truncated or corrupt",
            file=path,
            field=field,
            expected="a complete .safetensors file",
        ) from None


def _read_torch(path: Path, field: str) -> dict[str, torch.Tensor]:
    import torch

    from morphomol.util.torchload import load_failure_reason

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(
            f"refusing to load: not a plain state dict under torch.load(weights_only=True) "
            f"({load_failure_reason(exc)})",
            file=path,
            field=field,
            expected="a tensor-only state dict (.pt/.bin) or a .safetensors file",
        ) from None
    except Exception as exc:
        raise InputError(
            f"cannot read torch weights ({type(exc).__name__}: {exc}); the file may be truncated "
            "or corrupt",
            file=path,
            field=field,
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
            field=field,
            expected="a state dict, or a checkpoint with one under 'state_dict'",
        )
    return dict(obj)


def _resolve_dir_file(path: Path, names: Sequence[str], field: str) -> Path:
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
        field=field,
        expected="one of " + ", ".join(names),
    )


def read_state_dict(path: str | Path, spec: EncoderSpec | None = None, *,
                    field: str = "weights") -> dict[str, torch.Tensor]:
    """Read a state dict (CPU tensors, keys as stored) from a safetensors file, a torch state
    dict, a sharded index or an HF-style directory; ``spec`` restricts the accepted formats and
    names the directory's weight files. Errors name the file and ``field``."""
    p = Path(path)
    formats = spec.weight_formats if spec is not None else FORMATS
    names = spec.weight_files if spec is not None else HF_WEIGHT_FILES
    expected = expected_text(spec) if spec is not None else "a .safetensors, .pt/.bin file or an HF directory"
    if not p.exists():
        raise InputError("weights not found", file=p, field=field, expected=expected)
    fmt = format_of(p)
    if fmt not in formats:
        raise InputError(f"unsupported weights format '{fmt}'", file=p, field=field, expected=expected)
    if fmt == "hf_dir":
        p = _resolve_dir_file(p, names, field)
    if p.name.endswith(".index.json"):
        try:
            index = json.loads(p.read_text())
            shards = sorted(set(index["weight_map"].values()))
        except Exception as exc:
            raise InputError(f"unreadable shard index ({exc})", file=p, field="weight_map") from None
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(read_state_dict(p.parent / shard, field=field))
        return out
    if p.name.endswith(".safetensors"):
        return _read_safetensors(p, field)
    return _read_torch(p, field)


def adapt_state_dict(
    sd: Mapping[str, Any],
    *,
    select_prefix: Sequence[str] = (),
    ignore_prefixes: Sequence[str] = (),
) -> dict[str, Any]:
    """Apply the key rules (module docstring): strip wrapper prefixes shared by every key, keep
    only keys under the first ``select_prefix`` present (e.g. ``visual.`` of a full CLIP
    checkpoint, prefix removed), drop keys under ``ignore_prefixes``."""
    out = dict(sd)
    while out:
        shared = next((w for w in WRAPPER_PREFIXES if all(k.startswith(w) for k in out)), None)
        if shared is None:
            break
        out = {k[len(shared) :]: v for k, v in out.items()}
    for prefix in select_prefix:
        if any(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items() if k.startswith(prefix)}
            break
    if ignore_prefixes:
        out = {k: v for k, v in out.items() if not any(k.startswith(p) for p in ignore_prefixes)}
    return out


def read_encoder_state_dict(path: str | Path, spec: EncoderSpec, *, field: str = "weights") -> dict[str, torch.Tensor]:
    """:func:`read_state_dict` + :func:`adapt_state_dict` with ``spec``'s key rules."""
    return adapt_state_dict(read_state_dict(path, spec, field=field), select_prefix=spec.select_prefix,
                            ignore_prefixes=spec.ignore_prefixes)


# ------------------------------------------------------------------------------- loading


def load_weights_into(
    module: nn.Module,
    sd: Mapping[str, torch.Tensor],
    *,
    source: str | Path | None,
    encoder: str,
    field: str = "weights",
) -> None:
    """Strictly load ``sd`` into ``module`` (tensors cast to the module's dtypes); any
    missing/unexpected key or shape mismatch is an :class:`InputError` naming ``source`` and the
    first few offending keys."""
    import torch

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
            problems.append(f"missing keys: {first_items(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {first_items(unexpected)}")
        if mismatched:
            problems.append(f"mismatched shapes: {first_items(mismatched, 3)}")
        raise InputError(
            f"weights do not fit encoder '{encoder}' ({'; '.join(problems)})",
            file=source,
            field=field,
            expected=f"a state dict of the '{encoder}' architecture with the configured geometry",
        )
    with torch.no_grad():
        module.load_state_dict({k: sd[k].to(target[k].dtype) for k in target}, strict=True)


def load_timm_vit_weights(vit: nn.Module, path: str | Path, *, encoder: str = "vit_s",
                          field: str = "encoders.vit_s.weights") -> Path:
    """Load the weights file ``path`` into a timm VisionTransformer ``vit`` (built with
    ``num_classes=0``, ``global_pool='token'``) with exactly the rules of registry encoder
    ``encoder``'s feature extractor: its accepted formats, wrapper/select/ignore key rules
    (``head.*``, ``fc_norm.*`` dropped) and the strict load. Errors name the file and ``field``.
    Returns the checked path. Used by the fusion model's trainable ViT."""
    spec = get_spec(encoder)
    p = check_weights_path(spec, path, field=field)
    sd = read_encoder_state_dict(p, spec, field=field)
    load_weights_into(vit, sd, source=p, encoder=encoder, field=field)
    return p


# ------------------------------------------------------------------------------- writing


def save_weights(encoder: nn.Module, path: str | Path) -> Path:
    """Save an encoder's weights in the format implied by ``path``: ``*.safetensors``, a torch
    state dict (``*.pt|*.pth|*.bin``) or, for a path without suffix, an HF-style directory
    (``config.json`` + ``model.safetensors``; transformers models use ``save_pretrained``)."""
    import torch
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


__all__ = [
    "WRAPPER_PREFIXES", "weights_sha256", "weights_id", "format_of", "expected_text", "check_weights_path",
    "read_state_dict", "adapt_state_dict", "read_encoder_state_dict", "load_weights_into",
    "load_timm_vit_weights", "save_weights",
]
