"""The encoder registry: what each encoder is and which builder makes it. Torch-free.

Snakemake imports this while it builds the DAG (encoder kinds, which encoders need weights), so
nothing here, nor in the family modules that fill the registry (``timm_vit``, ``conch``,
``hf_vit``, ``loki``, ``geneformer``), imports torch, timm, transformers or open_clip: heavy
imports happen inside the builders, when an encoder is actually created.

A family module registers its encoders with the :func:`register_encoder` decorator on its builder
function, in the spirit of timm's ``@register_model``; one builder may serve several names::

    @register_encoder(name="uni", kind="image", architecture="timm vit_large_patch16_224 (UNI)",
                      model_name="vit_large_patch16_224", input_size=224, mean=IMAGENET_MEAN,
                      std=IMAGENET_STD, embed_dim=1024, pooling="cls", requires_weights=True,
                      defaults={"init_values": 1e-5})
    def build_timm_vit(spec, weights, overrides, seed, *, overrides_field=None): ...

A builder is called as ``builder(spec, weights, overrides, seed, overrides_field=FIELD)``:
``weights`` is a checked local path or None (seeded random init), ``overrides`` the user's
architecture/encoder options, ``overrides_field`` the config key to name in errors about them.
It returns a frozen-able ``nn.Module`` with ``.spec``, ``.dim``, ``.weights_id`` and ``.config``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, overload

from morphomol.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

#: weight formats: a ``*.safetensors`` file, a torch state dict, a Hugging Face style directory
FORMATS = ("safetensors", "torch", "hf_dir")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
#: files looked for in a weights directory, in this order (``NAME.index.json`` for sharded ones)
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DEFAULT_SEED = 0
KINDS = ("image", "expression")

Builder = Callable[..., Any]
B = TypeVar("B", bound=Builder)


@dataclass(frozen=True, kw_only=True)
class EncoderSpec:
    """What an encoder is, what it expects, and the builder that makes it.

    ``defaults`` are architecture keyword arguments the user's overrides may change;
    ``model_name`` names what the builder instantiates (a timm model, a transformers class, an
    open_clip config). ``select_prefix`` / ``ignore_prefixes`` are the checkpoint key rules of
    :func:`morphomol.encoders.weights.adapt_state_dict`: keep only the keys under the first
    prefix present (prefix removed), then drop the ignored ones.
    """

    name: str
    kind: str  # "image" | "expression"
    architecture: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int
    pooling: str
    requires_weights: bool
    builder: Builder
    weight_formats: tuple[str, ...] = FORMATS
    poolings: tuple[str, ...] = ("cls",)
    weight_files: tuple[str, ...] = HF_WEIGHT_FILES
    defaults: Mapping[str, Any] = field(default_factory=dict)
    model_name: str = ""
    select_prefix: tuple[str, ...] = ()
    ignore_prefixes: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"encoder {self.name}: kind must be image|expression, not {self.kind}")
        bad = set(self.weight_formats) - set(FORMATS)
        if bad:
            raise ValueError(f"encoder {self.name}: unknown weight formats {sorted(bad)}")
        if self.pooling not in self.poolings:
            raise ValueError(f"encoder {self.name}: pooling {self.pooling} not in {self.poolings}")
        if not callable(self.builder):
            raise ValueError(f"encoder {self.name}: builder must be callable")


_REGISTRY: dict[str, EncoderSpec] = {}


def _add(spec: EncoderSpec, overwrite: bool) -> EncoderSpec:
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"encoder {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


@overload
def register_encoder(spec: EncoderSpec, /, *, overwrite: bool = False) -> EncoderSpec: ...


@overload
def register_encoder(spec: None = None, /, *, overwrite: bool = False, **fields: Any) -> Callable[[B], B]: ...


def register_encoder(spec: EncoderSpec | None = None, /, *, overwrite: bool = False,
                     **fields: Any) -> EncoderSpec | Callable[[B], B]:
    """Register an encoder.

    As a decorator, ``@register_encoder(name=..., kind=..., ...)`` builds an :class:`EncoderSpec`
    from the keyword fields with the decorated function as its ``builder``, registers it and
    returns the function unchanged (so several decorators may share one builder).
    ``register_encoder(spec)`` registers a ready :class:`EncoderSpec` and returns it. A name that
    is already registered is a ``ValueError`` unless ``overwrite=True``.
    """
    if spec is not None:
        if fields:
            raise TypeError("register_encoder(spec) takes no other fields")
        return _add(spec, overwrite)
    if "builder" in fields:
        raise TypeError("the decorated function is the builder; do not pass builder=")

    def decorator(builder: B) -> B:
        _add(EncoderSpec(builder=builder, **fields), overwrite)
        return builder

    return decorator


def unregister_encoder(name: str) -> EncoderSpec | None:
    """Remove ``name`` from the registry (tests, plugins); returns its spec or None."""
    return _REGISTRY.pop(name, None)


def list_encoders() -> list[EncoderSpec]:
    """Every registered spec, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_spec(name: str) -> EncoderSpec:
    """The spec of encoder ``name``; an :class:`InputError` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(
            f"unknown encoder {name!r}", field="encoders", expected=f"one of {sorted(_REGISTRY)}"
        ) from None


def encoder_kind(name: str) -> str:
    """``image`` or ``expression``."""
    return get_spec(name).kind


def list_encoders_table(configured: Mapping[str, Any] | None = None) -> str:
    """A plain-text table of the registry (``morphomol encoders``).

    ``configured`` is the ``encoders`` config section; the last column shows the weights path set
    there (or whether the encoder can run without weights). Reads nothing but ``Path.exists``.
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


__all__ = [
    "EncoderSpec", "register_encoder", "unregister_encoder", "list_encoders", "get_spec", "encoder_kind",
    "list_encoders_table", "IMAGENET_MEAN", "IMAGENET_STD", "CLIP_MEAN", "CLIP_STD", "HALF", "FORMATS",
    "TORCH_SUFFIXES", "HF_WEIGHT_FILES", "DEFAULT_SEED",
]
