"""Slide encoders: how a slide's tile features become one slide embedding. Torch-free registry.

A registry in the spirit of :mod:`morphomol.encoders.registry`, for aggregators over the tile
features of the shared feature cache (the tile encoder's registry has only ``image`` and
``expression`` kinds; a slide encoder reads a bag of tile features, not images):

* ``mean``          mean of the slide's tile features; frozen, no weights (the baseline);
* ``abmil``         gated attention-MIL pooling (Ilse et al. 2018, as in TANGLE), trained jointly
                    with the projection heads by the contrastive loss;
* ``abmil_frozen``  the same gated ABMIL, *frozen*, from a local safetensors file (``slides.
                    slide_encoder_weights: {abmil_frozen: path}``): keys ``attention_a.weight``,
                    ``attention_a.bias``, ``attention_b.*``, ``attention_c.*``, ``encoder.0.*`` with
                    the shapes of :class:`morphomol.studies.slides.models.GatedABMIL`; the checkpoint
                    an ``abmil`` run writes (``slide.*`` keys) loads too.

Frozen encoders give one vector per slide before training (computed once per fold job);
trainable ones are part of the alignment model. Heavy modules live in :mod:`.models`.
"""

from __future__ import annotations

from dataclasses import dataclass

from morphomol.errors import InputError


@dataclass(frozen=True)
class SlideEncoderSpec:
    name: str
    description: str
    trainable: bool          # optimised with the projection heads
    requires_weights: bool   # a local weights file in slides.slide_encoder_weights
    bag: bool                # reads the tile bag (else the mean-pooled vector)


_REGISTRY: dict[str, SlideEncoderSpec] = {}


def register_slide_encoder(spec: SlideEncoderSpec) -> SlideEncoderSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"slide encoder {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_slide_encoder(name: str, *, file: object = None, field: str = "slides.poolings") -> SlideEncoderSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown slide encoder '{name}'", file=file, field=field,
                         expected="one of " + ", ".join(sorted(_REGISTRY))) from None


def list_slide_encoders() -> list[SlideEncoderSpec]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


register_slide_encoder(SlideEncoderSpec("mean", "mean of the tile features (baseline)", trainable=False,
                                        requires_weights=False, bag=False))
register_slide_encoder(SlideEncoderSpec("abmil", "gated attention-MIL pooling trained with the alignment",
                                        trainable=True, requires_weights=False, bag=True))
register_slide_encoder(SlideEncoderSpec("abmil_frozen", "frozen gated attention-MIL from local safetensors",
                                        trainable=False, requires_weights=True, bag=True))
