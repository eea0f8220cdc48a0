"""Every model variant of Table A.1 / A.2, built from one :class:`ModelSetting`.

A setting (one row of ``config/experiments/table_a1.yaml``) names a fusion stage
(``early`` | ``late`` | ``none``), a fusion strategy (``add`` | ``concat``), a morphology
encoder, an expression encoder and a transcript aggregation (``tile`` | ``token``).
:func:`build_model` turns it into one :class:`MorphoMolModel` assembled from four parts:

* :class:`ViTEncoder` — timm ``vit_small_patch16_224`` taking the loader's uint8 NHWC tiles
  (scaled to [0, 1] and normalised with mean = std = 0.5 inside the model);
* :class:`ExprMLP` — the expression encoder, applied to ``log1p`` counts per token
  (``(B, 196, G)``) or per tile (``(B, G)``);
* cached frozen features (CONCH, Phikon, Loki, a frozen ViT-S, Geneformer) passed in the
  batch as ``morph_feat`` / ``expr_feat`` — those encoders never run inside the trainer;
* a linear head on the fused embedding.

Forward pass per stage (``z`` is what the linear head sees)::

    early add     tokens = patch_embed(img) + pos ; tokens[1:] += MLP(log1p(x_core^i))  -> blocks -> CLS
    early concat  [CLS+pos0, patch_embed(img)+pos, MLP(log1p(x_core^i))+pos]           -> blocks -> CLS
                  (sequence 1 + 196 + 196; both token streams share the image pos-embed)
    late          z = z_img (+ or concat) z_core     z_img = CLS of the ViT or cached feature
                                                      z_core = MLP(tile) | mean_i MLP(token_i) | W·geneformer
    none          z = z_img  (morph-only)  or  z = z_core (expr-only, 1-layer MLP with 32 units)

The expression MLP is *zero-preserving*: it returns ``f(x) - f(0)``, so an empty patch
(no transcripts) gives an exactly-zero expression token. Early-fusion ``add`` on a tile
without transcripts therefore reduces exactly to the morph-only ViT on the same weights,
while the MLP keeps its biases (ReLU thresholds) for non-empty patches.

:class:`ClipModel` (Table A.2) pairs the same ViT with the same MLP (tile-level vector or
mean of token embeddings) through projection heads and a learnable temperature.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from morphomol.errors import InputError

GRID = 14
N_TOKENS = GRID * GRID

KINDS = ("regression", "min_mae", "clip")
FUSION_STAGES = ("early", "late", "none")
FUSION_STRATEGIES = ("add", "concat")
MORPH_ENCODERS = ("vit_s", "conch", "phikon", "loki")
EXPR_ENCODERS = ("mlp", "geneformer")
AGGREGATIONS = ("tile", "token")
#: encoders that cannot run without external weights (vit_s falls back to random init)
WEIGHTED_ENCODERS = ("conch", "phikon", "loki", "geneformer")
#: encoders that only exist here as cached frozen features (features/{encoder}/{sample}.zarr)
CACHED_ONLY_ENCODERS = ("conch", "phikon", "loki", "geneformer")

VIT_ARCH = "vit_small_patch16_224"


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ModelSetting:
    """One row of Table A.1 (``kind: regression``), the Min-MAE baseline or a CLIP row (A.2)."""

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
    requires_weights: tuple[str, ...] = ()
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- construction / validation
    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any], source: str | Path | None = None) -> ModelSetting:
        known = {f for f in cls.__dataclass_fields__ if f not in ("name", "extra")}
        d = dict(d)
        d.pop("name", None)
        extra = dict(d.pop("extra", None) or {})
        extra.update({k: d.pop(k) for k in list(d) if k not in known})
        req = d.get("requires_weights") or ()
        if isinstance(req, str):
            req = (req,)
        d["requires_weights"] = tuple(req)
        for key in ("freeze_morph", "freeze_expr"):
            if key in d and not isinstance(d[key], bool):
                raise InputError(f"setting '{name}': must be true or false", file=source, field=key,
                                 expected="a boolean")
        s = cls(name=name, extra=extra, **d)
        s.validate(source)
        return s

    def validate(self, source: str | Path | None = None) -> None:
        def bad(fld: str, expected: str) -> InputError:
            return InputError(f"setting '{self.name}': invalid value {getattr(self, fld)!r}",
                              file=source, field=fld, expected=expected)

        if self.kind not in KINDS:
            raise bad("kind", " | ".join(KINDS))
        if self.fusion_stage not in FUSION_STAGES:
            raise bad("fusion_stage", " | ".join(FUSION_STAGES))
        if self.morph_encoder not in (None, *MORPH_ENCODERS):
            raise bad("morph_encoder", " | ".join(MORPH_ENCODERS) + " | null")
        if self.expr_encoder not in (None, *EXPR_ENCODERS):
            raise bad("expr_encoder", " | ".join(EXPR_ENCODERS) + " | null")
        if self.expr_aggregation not in (None, *AGGREGATIONS):
            raise bad("expr_aggregation", "tile | token | null")
        for enc in (self.morph_encoder, self.expr_encoder):
            if enc in WEIGHTED_ENCODERS and enc not in self.requires_weights:
                raise InputError(f"setting '{self.name}': encoder '{enc}' needs external weights",
                                 file=source, field="requires_weights", expected=f"a list containing '{enc}'")
        if self.kind == "min_mae":
            return
        if self.expr_encoder is not None and self.expr_aggregation is None:
            raise bad("expr_aggregation", "tile | token when an expression encoder is set")
        if self.expr_encoder == "geneformer" and self.expr_aggregation != "tile":
            raise bad("expr_aggregation", "tile (Geneformer encodes a whole tile)")
        if self.expr_encoder == "geneformer" and not self.freeze_expr:
            raise bad("freeze_expr", "true (Geneformer is used as a frozen encoder)")
        if self.morph_encoder in ("conch", "phikon", "loki") and not self.freeze_morph:
            raise bad("freeze_morph", "true (foundation models are used as frozen feature extractors)")
        if self.kind == "clip":
            if self.morph_encoder != "vit_s" or self.expr_encoder != "mlp":
                raise bad("morph_encoder", "vit_s with expr_encoder mlp for CLIP settings")
            return
        if self.fusion_stage == "none":
            if (self.morph_encoder is None) == (self.expr_encoder is None):
                raise bad("fusion_stage", "early|late when both encoders are set (none = exactly one encoder)")
            if self.fusion_strategy is not None:
                raise bad("fusion_strategy", "null for unimodal settings")
            return
        if self.fusion_strategy not in FUSION_STRATEGIES:
            raise bad("fusion_strategy", "add | concat")
        if self.morph_encoder is None or self.expr_encoder is None:
            raise bad("fusion_stage", "'none' unless both a morph and an expression encoder are set")
        if self.fusion_stage == "early" and (self.morph_encoder != "vit_s" or self.expr_encoder != "mlp"
                                             or self.expr_aggregation != "token"):
            raise bad("fusion_stage", "early fusion with vit_s + mlp + token aggregation")

    # ---- what the setting needs
    @property
    def runs_vit(self) -> bool:
        """True when the ViT runs inside the model (fine-tuned, early fusion, or CLIP)."""
        if self.morph_encoder != "vit_s" or self.kind == "min_mae":
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
        return "geneformer" if self.kind == "regression" and self.expr_encoder == "geneformer" else None

    @property
    def cached_encoders(self) -> list[str]:
        return [e for e in (self.morph_cache, self.expr_cache) if e is not None]

    @property
    def needs_gpu(self) -> bool:
        """A ViT forward/backward per step (everything on cached features or counts is CPU work)."""
        return self.runs_vit

    @property
    def batch_fields(self) -> tuple[str, ...]:
        """Keys of the loader's batch dict this setting reads (images are skipped when cached)."""
        f: list[str] = []
        if self.runs_vit:
            f.append("image")
        if self.kind == "min_mae":
            f.append("tile")
        elif self.expr_encoder == "mlp":
            f.append("tokens" if self.expr_aggregation == "token" else "tile")
        if self.kind != "clip":
            f.append("target")
        return tuple(f)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["requires_weights"] = list(self.requires_weights)
        return d


def load_settings(path: str | Path) -> dict[str, ModelSetting]:
    """Read the settings file: ``settings: {name: {field: value}}``."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise InputError("settings file not found", file=path)
    with open(path) as fh:
        doc = yaml.safe_load(fh) or {}
    raw = doc.get("settings")
    if not isinstance(raw, dict) or not raw:
        raise InputError("no settings found", file=path, field="settings", expected="a mapping name -> setting")
    return {name: ModelSetting.from_dict(name, d or {}, source=path) for name, d in raw.items()}


def as_setting(setting: ModelSetting | dict[str, Any], name: str | None = None) -> ModelSetting:
    """Accept a :class:`ModelSetting` or the dict form Snakemake's ``SETTINGS`` holds."""
    if isinstance(setting, ModelSetting):
        return setting
    n = name or setting.get("name")
    if not n:
        raise InputError("setting dict without a name", field="name", expected="a setting name")
    return ModelSetting.from_dict(n, setting)


def encoder_weights(encoders_cfg: dict[str, Any] | None, name: str) -> str | None:
    """``encoders.<name>.weights`` from config, or None."""
    entry = (encoders_cfg or {}).get(name) or {}
    w = entry.get("weights") if isinstance(entry, dict) else entry
    return str(w) if w else None


def missing_weights(setting: ModelSetting, encoders_cfg: dict[str, Any] | None) -> list[str]:
    return [e for e in setting.requires_weights if encoder_weights(encoders_cfg, e) is None]


def is_runnable(setting: ModelSetting | dict[str, Any], encoders_cfg: dict[str, Any] | None,
                name: str | None = None) -> bool:
    """A setting is runnable when every encoder in ``requires_weights`` has configured weights."""
    return not missing_weights(as_setting(setting, name), encoders_cfg)


# --------------------------------------------------------------------------- weights


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights from safetensors or a torch file (``weights_only=True``, never a pickle)."""
    path = Path(path)
    if not path.exists():
        raise InputError("weights file not found", file=path, expected="a local .safetensors or .pt/.pth/.bin file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - report the reason in one line
            raise InputError(f"cannot read weights ({type(exc).__name__}: {exc})", file=path,
                             expected="a state dict saved with torch.save (no pickled objects)") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise InputError("weights file does not hold a state dict", file=path)
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "model.", "backbone.", "vit.", "encoder."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


# --------------------------------------------------------------------------- parts


class ViTEncoder(nn.Module):
    """timm ``vit_small_patch16_224`` on uint8 ``(B, H, W, 3)`` tiles; output = CLS embedding.

    ``vit_cfg`` overrides timm's geometry (``embed_dim``, ``depth``, ``num_heads``, and for
    tests ``img_size``/``patch_size`` as long as the token grid stays 14×14).
    """

    def __init__(self, vit_cfg: dict[str, Any] | None = None, weights: str | Path | None = None) -> None:
        super().__init__()
        import timm

        cfg = dict(vit_cfg or {})
        allowed = {"embed_dim", "depth", "num_heads", "img_size", "patch_size", "mlp_ratio", "drop_path_rate"}
        unknown = set(cfg) - allowed
        if unknown:
            raise InputError(f"unknown ViT option(s) {sorted(unknown)}", field="model.vit",
                             expected=", ".join(sorted(allowed)))
        self.vit = timm.create_model(VIT_ARCH, pretrained=False, num_classes=0, **cfg)
        if tuple(self.vit.patch_embed.grid_size) != (GRID, GRID):
            raise InputError(f"token grid {tuple(self.vit.patch_embed.grid_size)} is not {GRID}x{GRID}",
                             field="model.vit", expected="img_size / patch_size == 14")
        self.dim: int = int(self.vit.embed_dim)
        self.img_size: int = int(self.vit.patch_embed.img_size[0])
        self.pretrained = False
        if weights:
            self.load_weights(weights)

    def load_weights(self, path: str | Path) -> None:
        sd = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith("head.")}
        own = self.vit.state_dict()
        bad_shape = [k for k, v in sd.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
        if bad_shape:
            k = bad_shape[0]
            raise InputError(f"tensor '{k}' has shape {tuple(sd[k].shape)}", file=path, field=k,
                             expected=f"shape {tuple(own[k].shape)} ({VIT_ARCH} with this model.vit geometry)")
        missing, _unexpected = self.vit.load_state_dict(sd, strict=False)
        if missing:
            raise InputError(f"weights lack {len(missing)} tensor(s), e.g. '{missing[0]}'", file=path,
                             expected=f"a {VIT_ARCH} state dict")
        self.pretrained = True

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> float NCHW in [-1, 1] (mean = std = 0.5). The permute keeps channels-last strides."""
        x = image.permute(0, 3, 1, 2).float()
        return x.mul_(2.0 / 255.0).sub_(1.0)  # (x / 255 - 0.5) / 0.5

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """Patch embeddings + CLS + positional embeddings: ``(B, 1 + 196, d)`` (before the blocks)."""
        v = self.vit
        x = v.patch_embed(self.normalise(image))
        x = v._pos_embed(x)
        x = v.patch_drop(x)
        return v.norm_pre(x)

    @property
    def patch_pos_embed(self) -> torch.Tensor:
        """Positional embeddings of the 196 patch positions, ``(1, 196, d)``."""
        return self.vit.pos_embed[:, -N_TOKENS:]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Transformer blocks + final norm + CLS pooling on an embedded sequence -> ``(B, d)``."""
        v = self.vit
        x = v.norm(v.blocks(x))
        return v.forward_head(x, pre_logits=True)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encode(self.embed(image))


class ExprMLP(nn.Module):
    """Expression encoder on ``log1p`` counts, applied to the last axis (tile ``(B,G)`` or tokens ``(B,196,G)``).

    ``layers=2``: ``Linear(G,h)-ReLU-Linear(h,h)``, then (``out_dim`` given) ``ReLU-Linear(h,out_dim)``
    projecting to the ViT token width. ``layers=1``: ``Linear(G,h)-ReLU`` (the expr-only MLP).
    Zero-preserving: returns ``f(x) - f(0)`` (exactly 0 where the input row is all zeros), so an
    empty patch maps to a zero token while the layers keep their biases.
    """

    def __init__(self, n_in: int, hidden: int = 32, out_dim: int | None = None, layers: int = 2) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Linear(n_in, hidden), nn.ReLU()]
        if layers >= 2:
            mods.append(nn.Linear(hidden, hidden))
            for _ in range(layers - 2):
                mods += [nn.ReLU(), nn.Linear(hidden, hidden)]
        if out_dim is not None:
            if layers >= 2:
                mods.append(nn.ReLU())
            mods.append(nn.Linear(hidden, out_dim))
        self.net = nn.Sequential(*mods)
        self.n_in = n_in
        self.out_dim = out_dim if out_dim is not None else hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x) - self.net(x.new_zeros(self.n_in))
        # f(x) - f(0) is zero up to rounding (batched and single-row matmuls round differently);
        # the mask makes an empty patch / tile exactly zero.
        return out * (x != 0).any(dim=-1, keepdim=True).to(out.dtype)


# --------------------------------------------------------------------------- the model


class MorphoMolModel(nn.Module):
    """One model for every regression setting of Table A.1 (see the module docstring)."""

    def __init__(
        self,
        setting: ModelSetting,
        n_core: int,
        n_targets: int,
        *,
        vit_cfg: dict[str, Any] | None = None,
        vit_weights: str | Path | None = None,
        expr_hidden: int = 32,
        morph_dim: int | None = None,
        expr_dim: int | None = None,
    ) -> None:
        super().__init__()
        if setting.kind != "regression":
            raise ValueError(f"setting {setting.name} is kind={setting.kind}, not a regression model")
        self.setting = setting
        s = setting
        self.vit: ViTEncoder | None = ViTEncoder(vit_cfg, vit_weights) if s.runs_vit else None
        if self.vit is not None and s.freeze_morph:
            self.vit.requires_grad_(False)
            self.vit.eval()

        # width of the morphology embedding z_img
        if self.vit is not None:
            d_img = self.vit.dim
        elif s.morph_cache is not None:
            if not morph_dim:
                raise ValueError(f"setting {s.name}: morph_dim (width of cached {s.morph_cache} features) is required")
            d_img = int(morph_dim)
        else:
            d_img = 0

        # expression encoder -> z_core of width d_img (fusion) or its own width (expr-only)
        self.expr: nn.Module | None = None
        d_expr = 0
        if s.expr_encoder == "mlp":
            if s.fusion_stage == "none":
                self.expr = ExprMLP(n_core, expr_hidden, out_dim=None, layers=1)
            else:
                self.expr = ExprMLP(n_core, expr_hidden, out_dim=d_img, layers=2)
            d_expr = self.expr.out_dim  # type: ignore[assignment]
        elif s.expr_encoder == "geneformer":
            if not expr_dim:
                raise ValueError(f"setting {s.name}: expr_dim (width of cached geneformer features) is required")
            # expr-only: linear probe on the frozen features; fusion: project to the morph width
            self.expr = nn.Identity() if s.fusion_stage == "none" else nn.Linear(int(expr_dim), d_img)
            d_expr = int(expr_dim) if s.fusion_stage == "none" else d_img

        if s.fusion_stage == "early" or (s.fusion_stage == "late" and s.fusion_strategy == "add"):
            d_z = d_img
        elif s.fusion_stage == "late":
            d_z = d_img + d_expr
        else:
            d_z = d_img or d_expr
        self.head = nn.Linear(d_z, n_targets)
        self.n_core, self.n_targets, self.d_z = n_core, n_targets, d_z

    # ---- parts of the forward pass
    def train(self, mode: bool = True) -> MorphoMolModel:
        super().train(mode)
        if self.vit is not None and self.setting.freeze_morph:
            self.vit.eval()  # a frozen backbone stays in eval mode
        return self

    def morph_embedding(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.vit is not None:
            return self.vit(batch["image"])
        return batch["morph_feat"].float()

    def expr_embedding(self, batch: dict[str, Any]) -> torch.Tensor:
        s = self.setting
        assert self.expr is not None
        if s.expr_encoder == "geneformer":
            return self.expr(batch["expr_feat"].float())
        if s.expr_aggregation == "tile":
            return self.expr(torch.log1p(batch["tile"].float()))
        return self.expr(torch.log1p(batch["tokens"].float())).mean(dim=1)

    def early_sequence(self, batch: dict[str, Any]) -> torch.Tensor:
        """The fused token sequence entering the ViT blocks."""
        assert self.vit is not None and self.expr is not None
        x = self.vit.embed(batch["image"])  # (B, 1+196, d), pos-embed included
        e = self.expr(torch.log1p(batch["tokens"].float())).to(x.dtype)  # (B, 196, d)
        if self.setting.fusion_strategy == "add":
            return torch.cat([x[:, :1], x[:, 1:] + e], dim=1)
        return torch.cat([x, e + self.vit.patch_pos_embed.to(x.dtype)], dim=1)  # (B, 1+196+196, d)

    def embedding(self, batch: dict[str, Any]) -> torch.Tensor:
        """The representation the linear head sees, ``(B, d_z)``."""
        s = self.setting
        if s.fusion_stage == "early":
            assert self.vit is not None
            return self.vit.encode(self.early_sequence(batch))
        if s.fusion_stage == "late":
            z_img, z_core = self.morph_embedding(batch), self.expr_embedding(batch)
            z_core = z_core.to(z_img.dtype)
            return z_img + z_core if s.fusion_strategy == "add" else torch.cat([z_img, z_core], dim=1)
        return self.morph_embedding(batch) if s.morph_encoder is not None else self.expr_embedding(batch)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.head(self.embedding(batch))

    # ---- optimisation
    def param_groups(self, lr_head: float, lr_backbone: float) -> list[dict[str, Any]]:
        """AdamW groups: ``backbone`` (trainable ViT, lr_backbone) and ``head`` (head + expression encoder)."""
        backbone = [p for p in self.vit.parameters() if p.requires_grad] if self.vit is not None else []
        ids = {id(p) for p in backbone}
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"name": "head", "params": head, "lr": lr_head}]
        if backbone:
            groups.append({"name": "backbone", "params": backbone, "lr": lr_backbone})
        return groups

    def param_counts(self) -> dict[str, int]:
        """Parameter counts in the spirit of Table A.3 (cached frozen encoders are not counted)."""
        head = sum(p.numel() for p in self.head.parameters())
        backbone = [p for n, p in self.named_parameters() if not n.startswith("head.")]
        return {"head": head, "backbone_total": sum(p.numel() for p in backbone),
                "backbone_trainable": sum(p.numel() for p in backbone if p.requires_grad)}


def build_model(
    setting: ModelSetting,
    n_core: int,
    n_targets: int,
    model_cfg: dict[str, Any] | None = None,
    *,
    vit_weights: str | Path | None = None,
    morph_dim: int | None = None,
    expr_dim: int | None = None,
) -> MorphoMolModel:
    """Build the model of a regression setting; ``model_cfg`` is config ``model`` (``vit``, ``expr_hidden``)."""
    cfg = model_cfg or {}
    return MorphoMolModel(setting, n_core, n_targets, vit_cfg=cfg.get("vit"), vit_weights=vit_weights,
                          expr_hidden=int(cfg.get("expr_hidden", 32)), morph_dim=morph_dim, expr_dim=expr_dim)


# --------------------------------------------------------------------------- CLIP (Table A.2)


class ClipModel(nn.Module):
    """ViT image encoder vs core-transcript encoder, projection heads, learnable temperature.

    ``tile`` aggregation encodes the tile-level core vector; ``token`` encodes every token and
    averages the token embeddings. Both towers end in a linear projection to ``proj_dim`` and
    L2 normalisation. ``logit_scale`` starts at ``log(1/0.07)`` and is clamped to ``[0, log 100]``.
    """

    MAX_LOGIT_SCALE = math.log(100.0)

    def __init__(self, setting: ModelSetting, n_core: int, *, vit_cfg: dict[str, Any] | None = None,
                 vit_weights: str | Path | None = None, expr_hidden: int = 32, proj_dim: int = 128) -> None:
        super().__init__()
        if setting.kind != "clip":
            raise ValueError(f"setting {setting.name} is not a CLIP setting")
        self.setting = setting
        self.vit = ViTEncoder(vit_cfg, vit_weights)
        if setting.freeze_morph:
            self.vit.requires_grad_(False)
        self.expr = ExprMLP(n_core, expr_hidden, out_dim=None, layers=2)
        self.img_proj = nn.Linear(self.vit.dim, proj_dim)
        self.expr_proj = nn.Linear(self.expr.out_dim, proj_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, batch: dict[str, Any]) -> torch.Tensor:
        return F.normalize(self.img_proj(self.vit(batch["image"])).float(), dim=-1)

    def encode_expr(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.setting.expr_aggregation == "tile":
            h = self.expr(torch.log1p(batch["tile"].float()))
        else:
            h = self.expr(torch.log1p(batch["tokens"].float())).mean(dim=1)
        return F.normalize(self.expr_proj(h).float(), dim=-1)

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(batch), self.encode_expr(batch)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(0.0, self.MAX_LOGIT_SCALE).exp()

    def param_groups(self, lr_head: float, lr_backbone: float) -> list[dict[str, Any]]:
        backbone = [p for p in self.vit.parameters() if p.requires_grad]
        ids = {id(p) for p in backbone}
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"name": "head", "params": head, "lr": lr_head}]
        if backbone:
            groups.append({"name": "backbone", "params": backbone, "lr": lr_backbone})
        return groups


def clip_loss(img: torch.Tensor, expr: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: cross-entropy image→expression and expression→image, averaged."""
    logits = scale * img @ expr.t()
    labels = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def build_clip_model(setting: ModelSetting, n_core: int, model_cfg: dict[str, Any] | None = None, *,
                     vit_weights: str | Path | None = None) -> ClipModel:
    cfg = model_cfg or {}
    return ClipModel(setting, n_core, vit_cfg=cfg.get("vit"), vit_weights=vit_weights,
                     expr_hidden=int(cfg.get("expr_hidden", 32)), proj_dim=int(cfg.get("clip_proj_dim", 128)))
