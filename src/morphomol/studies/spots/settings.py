"""Settings of the spots study (``config/experiments/spots.yaml``): one row per trained head.

Torch-free (Snakemake reads the settings while it builds the DAG). Validated against
``workflow/schemas/settings.spots.schema.yaml`` (strict); the encoder of a row (or ``spots.encoder``)
is checked against the encoder registry. A setting needs captions when it aligns to them; it is not
runnable (its table row says why) when its encoder needs weights that are not configured, or when
it aligns to captions and the cohort has none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from morphomol.errors import InputError

SCHEMA = "settings.spots.schema.yaml"
ROLES = ("reference", "ablation", "alignment", "control")
#: run names of the baselines (not settings: spots.baselines switches them)
BASELINES = ("ridge_hest", "ridge_cv", "mean", "depth_only")


@dataclass(frozen=True)
class HeadSpec:
    """The regression head: Linear layers of ``hidden`` widths (ReLU/GELU, optional batch norm and
    dropout after each hidden layer) then Linear(..., n_genes)."""

    hidden: tuple[int, ...] = (1024,)
    activation: str = "relu"
    dropout: float = 0.0
    batch_norm: bool = False

    @property
    def depth(self) -> int:
        return len(self.hidden) + 1


@dataclass(frozen=True)
class AlignSpec:
    """Caption alignment: an alignment head maps the predicted gene vector into the text space;
    loss = MSE + weight * (1 - cos) on spots with a caption, weight ramped over ``warmup_epochs``."""

    weight: float
    warmup_epochs: float = 2.0
    captions: str = "matched"  # matched | shuffled
    hidden: int | None = None


@dataclass(frozen=True)
class SpotSetting:
    name: str
    description: str = ""
    role: str = "ablation"
    encoder: str | None = None
    head: HeadSpec = field(default_factory=HeadSpec)
    align: AlignSpec | None = None

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any], source: str | Path | None = None) -> SpotSetting:
        from morphomol.config.schema import validate

        doc = {"settings": {name: dict(d)}}
        validate(doc, SCHEMA, source)
        return cls._build(name, doc["settings"][name])

    @classmethod
    def _build(cls, name: str, d: Mapping[str, Any]) -> SpotSetting:
        head = d.get("head") or {}
        h = HeadSpec(hidden=tuple(int(x) for x in head.get("hidden", (1024,))),
                     activation=str(head.get("activation", "relu")), dropout=float(head.get("dropout", 0.0)),
                     batch_norm=bool(head.get("batch_norm", False)))
        a = d.get("align")
        align = None
        if a is not None:
            align = AlignSpec(weight=float(a["weight"]), warmup_epochs=float(a.get("warmup_epochs", 2.0)),
                              captions=str(a.get("captions", "matched")),
                              hidden=int(a["hidden"]) if a.get("hidden") is not None else None)
        return cls(name=name, description=str(d.get("description", "")), role=str(d.get("role", "ablation")),
                   encoder=d.get("encoder"), head=h, align=align)

    def encoder_for(self, default: str) -> str:
        return self.encoder or default

    @property
    def needs_captions(self) -> bool:
        return self.align is not None

    def not_runnable_reason(self, *, default_encoder: str, weights: Mapping[str, str | None],
                            has_captions: bool) -> str | None:
        from morphomol.encoders.registry import get_spec

        enc = self.encoder_for(default_encoder)
        if get_spec(enc).requires_weights and not weights.get(enc):
            return f"missing weights: {enc} (set encoders.{enc}.weights)"
        if self.needs_captions and not has_captions:
            return "no captions (set spots.captions.source to csv or vlm, and spots.captions.sentence_model)"
        return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("name")
        d["head"]["hidden"] = list(self.head.hidden)
        return d


def _check_encoder(s: SpotSetting, source: str | Path | None) -> None:
    from morphomol.encoders.registry import list_encoders

    if s.encoder is None:
        return
    image = [e.name for e in list_encoders() if e.kind == "image"]
    if s.encoder not in image:
        raise InputError(f"invalid value {s.encoder!r}", file=source, field=f"settings.{s.name}.encoder",
                         expected="an image encoder of the registry (" + ", ".join(image) + ") or null")


def load_settings(path: str | Path) -> dict[str, SpotSetting]:
    """Read and validate the settings file: ``settings: {name: {field: value}}``."""
    from morphomol.config.schema import read_yaml, validate

    path = Path(path)
    doc = read_yaml(path, "settings file")
    if not isinstance(doc, dict):
        raise InputError("expected a mapping 'settings: {name: {...}}'", file=path, field="settings")
    validate(doc, SCHEMA, path)
    out: dict[str, SpotSetting] = {}
    for name, d in doc["settings"].items():
        s = SpotSetting._build(str(name), d)
        _check_encoder(s, path)
        out[str(name)] = s
    return out


def as_setting(setting: SpotSetting | Mapping[str, Any], name: str | None = None) -> SpotSetting:
    """A :class:`SpotSetting`, or one built from its dict form (rule params, tests)."""
    if isinstance(setting, SpotSetting):
        return setting
    d = dict(setting)
    n = name or d.pop("name", None)
    if not n:
        raise InputError("setting dict without a name", field="name", expected="a setting name")
    d.pop("name", None)
    if isinstance(d.get("head"), dict) and "hidden" in d["head"]:
        d["head"] = {**d["head"], "hidden": list(d["head"]["hidden"])}
    return SpotSetting.from_dict(n, d)
