"""Model settings of the fusion study (``config/experiments/table_a1.yaml``): the only settings type.

Torch-free: Snakemake reads the settings while it builds the DAG (which rule trains a setting,
which cached features it needs). The settings file is validated against
``workflow/schemas/settings.fusion.schema.yaml`` (strict: a misspelled field is an error naming
the setting and the field); the encoder registry (:mod:`morphomol.encoders.registry`) is the single
source of which encoders exist and which need weights, so any registered image encoder can be a
setting's morph encoder (used frozen, through the feature cache) and ``vit_s`` can also run inside
the model (fine-tuned or early fusion).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from morphomol.errors import InputError

SCHEMA = "settings.fusion.schema.yaml"
#: the morph encoder that can run inside the model (fine-tuned / early fusion)
IN_MODEL_ENCODER = "vit_s"
#: the trained expression encoder (everything else is a frozen registry encoder, through the cache)
MLP = "mlp"
#: training job of a setting -> Snakemake rule
JOBS = ("train", "train_cpu", "min_mae", "clip")


@dataclass(frozen=True)
class ModelSetting:
    """One row of Table A.1 (``kind: regression``), the Min-MAE baseline or a CLIP row (Table A.2)."""

    name: str
    kind: str = "regression"
    fusion_stage: str = "none"
    fusion_strategy: str | None = None
    morph_encoder: str | None = None
    freeze_morph: bool = False
    expr_encoder: str | None = None
    freeze_expr: bool = False
    expr_aggregation: str | None = None
    paper_row: int | str | None = None
    description: str = ""

    # ---- construction
    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any], source: str | Path | None = None) -> ModelSetting:
        from morphomol.config.schema import validate

        doc = {"settings": {name: dict(d)}}
        validate(doc, SCHEMA, source)
        s = cls(name=name, **doc["settings"][name])
        s.validate(source)
        return s

    def validate(self, source: str | Path | None = None) -> None:
        """Combinations the schema cannot express; encoder names against the registry."""
        from morphomol.encoders.registry import get_spec, list_encoders

        def bad(fld: str, expected: str) -> InputError:
            return InputError(f"invalid value {getattr(self, fld)!r}", file=source,
                              field=f"settings.{self.name}.{fld}", expected=expected)

        image = [s.name for s in list_encoders() if s.kind == "image"]
        expression = [s.name for s in list_encoders() if s.kind == "expression"]
        if self.morph_encoder is not None and self.morph_encoder not in image:
            raise bad("morph_encoder", "an image encoder of the registry (" + ", ".join(image) + ") or null")
        if self.expr_encoder is not None and self.expr_encoder not in (MLP, *expression):
            raise bad("expr_encoder", "mlp, an expression encoder of the registry (" + ", ".join(expression)
                      + ") or null")
        if self.kind == "min_mae":
            return
        if self.expr_encoder is not None and self.expr_aggregation is None:
            raise bad("expr_aggregation", "tile | token when an expression encoder is set")
        if self.expr_encoder not in (None, MLP):
            if self.expr_aggregation != "tile":
                raise bad("expr_aggregation", f"tile ({self.expr_encoder} encodes a whole tile)")
            if not self.freeze_expr:
                raise bad("freeze_expr", f"true ({self.expr_encoder} is used as a frozen encoder)")
        if self.morph_encoder not in (None, IN_MODEL_ENCODER) and not self.freeze_morph:
            raise bad("freeze_morph", f"true ({self.morph_encoder} is used as a frozen feature extractor; "
                                      f"only {IN_MODEL_ENCODER} is fine-tuned)")
        if self.kind == "clip":
            if self.morph_encoder != IN_MODEL_ENCODER or self.expr_encoder != MLP:
                raise bad("morph_encoder", f"{IN_MODEL_ENCODER} with expr_encoder mlp for CLIP settings")
            return
        if self.fusion_stage == "none":
            if (self.morph_encoder is None) == (self.expr_encoder is None):
                raise bad("fusion_stage", "early|late when both encoders are set (none = exactly one encoder)")
            if self.fusion_strategy is not None:
                raise bad("fusion_strategy", "null for unimodal settings")
            return
        if self.fusion_strategy is None:
            raise bad("fusion_strategy", "add | concat")
        if self.morph_encoder is None or self.expr_encoder is None:
            raise bad("fusion_stage", "'none' unless both a morph and an expression encoder are set")
        if self.fusion_stage == "early" and (self.morph_encoder != IN_MODEL_ENCODER or self.expr_encoder != MLP
                                             or self.expr_aggregation != "token"):
            raise bad("fusion_stage", f"early fusion with {IN_MODEL_ENCODER} + mlp + token aggregation")
        for enc in self.encoders:
            get_spec(enc)

    # ---- what the setting needs
    @property
    def encoders(self) -> tuple[str, ...]:
        """Registry encoders the setting uses (the trained MLP is not one)."""
        return tuple(e for e in (self.morph_encoder, self.expr_encoder) if e not in (None, MLP))

    def required_weights(self) -> tuple[str, ...]:
        """Encoders that cannot run without configured weights (from the registry)."""
        from morphomol.encoders.registry import get_spec

        return tuple(e for e in self.encoders if get_spec(e).requires_weights)

    def missing_weights(self, weights: Mapping[str, str | None]) -> list[str]:
        """Required encoders without weights in ``weights`` (encoder -> path or None)."""
        return [e for e in self.required_weights() if not weights.get(e)]

    def not_runnable_reason(self, weights: Mapping[str, str | None]) -> str | None:
        missing = self.missing_weights(weights)
        if missing:
            return "missing weights: " + ", ".join(f"{e} (set encoders.{e}.weights)" for e in missing)
        return None

    @property
    def runs_vit(self) -> bool:
        """True when the ViT runs inside the model (fine-tuned, early fusion, or CLIP)."""
        if self.morph_encoder != IN_MODEL_ENCODER or self.kind == "min_mae":
            return False
        return self.kind == "clip" or not self.freeze_morph or self.fusion_stage == "early"

    @property
    def morph_cache(self) -> str | None:
        """Encoder whose cached frozen features replace the morph encoder (or None)."""
        if self.kind != "regression" or self.morph_encoder is None or self.runs_vit:
            return None
        return self.morph_encoder

    @property
    def expr_cache(self) -> str | None:
        """Encoder whose cached frozen features replace the expression encoder (or None)."""
        if self.kind == "regression" and self.expr_encoder not in (None, MLP):
            return self.expr_encoder
        return None

    @property
    def cached_encoders(self) -> list[str]:
        return [e for e in (self.morph_cache, self.expr_cache) if e is not None]

    @property
    def job(self) -> str:
        """The Snakemake rule that runs the setting: train (a ViT per step: GPU), train_cpu (cached
        features / counts), min_mae, clip."""
        if self.kind in ("min_mae", "clip"):
            return self.kind
        return "train" if self.runs_vit else "train_cpu"

    @property
    def needs_gpu(self) -> bool:
        return self.runs_vit

    @property
    def is_morph_only(self) -> bool:
        return self.kind == "regression" and self.fusion_stage == "none" and self.morph_encoder is not None

    @property
    def batch_fields(self) -> tuple[str, ...]:
        """Keys of the loader's batch dict this setting reads (images are skipped when cached)."""
        f: list[str] = []
        if self.runs_vit:
            f.append("image")
        if self.kind == "min_mae":
            f.append("tile")
        elif self.expr_encoder == MLP:
            f.append("tokens" if self.expr_aggregation == "token" else "tile")
        if self.kind != "clip":
            f.append("target")
        return tuple(f)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("name")
        return d


def load_settings(path: str | Path) -> dict[str, ModelSetting]:
    """Read and validate the settings file: ``settings: {name: {field: value}}``."""
    from morphomol.config.schema import read_yaml, validate

    path = Path(path)
    doc = read_yaml(path, "settings file")
    if not isinstance(doc, dict):
        raise InputError("expected a mapping 'settings: {name: {...}}'", file=path, field="settings")
    validate(doc, SCHEMA, path)
    out = {}
    for name, d in doc["settings"].items():
        s = ModelSetting(name=str(name), **d)
        s.validate(path)
        out[str(name)] = s
    return out


def as_setting(setting: ModelSetting | Mapping[str, Any], name: str | None = None) -> ModelSetting:
    """A :class:`ModelSetting`, or one built from its dict form (tests, notebooks)."""
    if isinstance(setting, ModelSetting):
        return setting
    d = dict(setting)
    n = name or d.pop("name", None)
    if not n:
        raise InputError("setting dict without a name", field="name", expected="a setting name")
    d.pop("name", None)
    return ModelSetting.from_dict(n, d)
