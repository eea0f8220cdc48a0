"""Model variants of Table A.1/A.2 on a tiny ViT (224 px input, 14x14 tokens, width 32, depth 1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from morphomol.config import default_sections
from morphomol.errors import InputError
from morphomol.models.contrastive import clip_loss
from morphomol.models.mlp import ExprMLP
from morphomol.models.vit import N_TOKENS, ViTEncoder
from morphomol.studies.fusion.models import build_clip_model, build_model
from morphomol.studies.fusion.settings import ModelSetting, load_settings

ROOT = Path(__file__).resolve().parents[1]
SETTINGS_FILE = ROOT / "config" / "experiments" / "table_a1.yaml"
TINY = default_sections(model={"vit": {"embed_dim": 32, "depth": 1, "num_heads": 2}, "expr_hidden": 32}).model
G, T, B = 6, 4, 3
FEAT_DIM = {"morph": 24, "expr": 20}


@pytest.fixture(scope="module")
def settings() -> dict[str, ModelSetting]:
    return load_settings(SETTINGS_FILE)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: oversubscribed threads are much slower than one
    yield
    torch.set_num_threads(old)


def make_batch(b: int = B, *, zero_tokens: bool = False, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.poisson(torch.full((b, N_TOKENS, G), 0.7), generator=g)
    if zero_tokens:
        tokens.zero_()
    return {
        "image": torch.randint(0, 256, (b, 224, 224, 3), dtype=torch.uint8, generator=g),
        "tokens": tokens,
        "tile": tokens.sum(1),
        "target": torch.rand(b, T, generator=g),
        "morph_feat": torch.randn(b, FEAT_DIM["morph"], generator=g),
        "expr_feat": torch.randn(b, FEAT_DIM["expr"], generator=g),
        "tile_id": [f"s__{i:06d}" for i in range(b)],
    }


def tiny_model(s: ModelSetting) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(s, G, T, TINY, morph_dim=FEAT_DIM["morph"] if s.morph_cache else None,
                       expr_dim=FEAT_DIM["expr"] if s.expr_cache else None)


# ---------------------------------------------------------------- settings file


def test_settings_file_lists_every_table_row(settings):
    reg = {n: s for n, s in settings.items() if s.kind == "regression"}
    assert sorted(s.paper_row for s in reg.values()) == list(range(34))
    assert settings["min_mae"].kind == "min_mae"
    assert {n for n, s in settings.items() if s.kind == "clip"} == {"clip_token", "clip_tile"}
    assert settings["clip_token"].expr_aggregation == "token" and settings["clip_tile"].expr_aggregation == "tile"
    # rows 10 and 11 are made distinct: tile vs token
    by_row = {s.paper_row: s for s in reg.values()}
    assert (by_row[10].expr_aggregation, by_row[11].expr_aggregation) == ("tile", "token")
    assert len({(s.fusion_stage, s.fusion_strategy, s.morph_encoder, s.freeze_morph, s.expr_encoder,
                 s.expr_aggregation) for s in reg.values()}) == 34
    # paper headline rows
    assert by_row[0].name == "early_add_vits_ft_mlp_token"
    assert by_row[26].name == "late_concat_vits_fz_mlp_token"
    assert by_row[33].fusion_stage == "none" and by_row[33].expr_encoder == "mlp"


def is_runnable(s, weights):
    return s.not_runnable_reason(weights) is None


def test_runnable_depends_on_configured_weights(settings):
    no_weights = {n for n, s in settings.items() if is_runnable(s, {})}
    assert no_weights == {
        "early_add_vits_ft_mlp_token", "early_add_vits_fz_mlp_token", "early_concat_vits_ft_mlp_token",
        "late_add_vits_ft_mlp_tile", "late_add_vits_ft_mlp_token", "late_add_vits_fz_mlp_tile",
        "late_add_vits_fz_mlp_token", "late_concat_vits_ft_mlp_tile", "late_concat_vits_ft_mlp_token",
        "late_concat_vits_fz_mlp_tile", "late_concat_vits_fz_mlp_token", "morph_vits_ft", "morph_vits_fz",
        "expr_mlp_token", "min_mae", "clip_token", "clip_tile"}
    s = settings["late_add_conch_fz_gf_tile"]
    assert s.missing_weights({"conch": "c.safetensors"}) == ["geneformer"]
    assert is_runnable(s, {"conch": "c.bin", "geneformer": "g.bin"})
    # the dict form (what the rules pass as params) round-trips
    assert all(ModelSetting.from_dict(n, x.to_dict()) == x for n, x in settings.items())


def test_invalid_settings_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="fusion_strategy"):
        ModelSetting.from_dict("x", {"fusion_stage": "late", "fusion_strategy": "multiply", "morph_encoder": "vit_s",
                                     "expr_encoder": "mlp", "expr_aggregation": "tile"})
    with pytest.raises(InputError, match="freeze_morph"):
        ModelSetting.from_dict("x", {"fusion_stage": "none", "morph_encoder": "conch", "freeze_morph": False})
    with pytest.raises(InputError, match="early fusion"):
        ModelSetting.from_dict("x", {"fusion_stage": "early", "fusion_strategy": "add", "morph_encoder": "vit_s",
                                     "expr_encoder": "mlp", "expr_aggregation": "tile"})
    bad = tmp_path / "s.yaml"
    bad.write_text("settings:\n  a: {fusion_stage: sideways}\n")
    with pytest.raises(InputError, match=str(bad)):
        load_settings(bad)


# ---------------------------------------------------------------- every setting


def test_forward_backward_every_regression_setting(settings):
    batch = make_batch()
    for name, s in settings.items():
        if s.kind != "regression":
            continue
        model = tiny_model(s)
        model.train()
        out = model(batch)
        assert out.shape == (B, T), name
        torch.nn.functional.mse_loss(out, batch["target"]).backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable, name
        assert all(p.grad is not None for p in model.head.parameters()), name
        if model.expr is not None and any(p.requires_grad for p in model.expr.parameters()):
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.expr.parameters()), name
        if model.vit is not None:
            if s.freeze_morph:
                assert not model.vit.training, f"{name}: frozen ViT must stay in eval mode"
                assert all(not p.requires_grad and p.grad is None for p in model.vit.parameters()), name
            else:
                assert model.vit.training
                assert model.vit.vit.patch_embed.proj.weight.grad is not None, name
        # the batch fields the setting declares are the ones it reads
        needed = set(s.batch_fields) | {"tile_id"}
        needed |= {"morph_feat"} if s.morph_cache else set()
        needed |= {"expr_feat"} if s.expr_cache else set()
        small = {k: v for k, v in batch.items() if k in needed}
        assert model(small).shape == (B, T), name


def test_fused_widths_match_table_a3(settings):
    # ViT-S width 384: early / late add / morph-only heads see 384, late concat 768, expr-only MLP 32
    full = default_sections(model={"vit": {"embed_dim": 384, "depth": 1, "num_heads": 6}}).model
    assert build_model(settings["early_add_vits_ft_mlp_token"], 380, 100, full).head.in_features == 384
    assert build_model(settings["late_concat_vits_ft_mlp_token"], 380, 100, full).head.in_features == 768
    assert build_model(settings["late_add_vits_ft_mlp_tile"], 380, 100, full).head.in_features == 384
    m = build_model(settings["expr_mlp_token"], 380, 100, full)
    assert m.head.in_features == 32 and m.param_counts()["head"] == 3300  # Table A.3 expr head
    m = build_model(settings["late_concat_phikon_fz_mlp_tile"], 380, 100, full, morph_dim=1024)
    assert m.param_counts()["head"] == 204900  # Table A.3 phikon concat head
    m = build_model(settings["expr_gf_tile"], 380, 100, full, expr_dim=512)
    assert m.param_counts()["head"] == 51300  # Table A.3 geneformer expr head


def test_expr_mlp_maps_zero_to_zero():
    mlp = ExprMLP(G, 32, out_dim=16)
    torch.nn.init.normal_(mlp.net[0].bias, std=1.0)  # biases alone would shift an empty patch
    x = torch.zeros(2, N_TOKENS, G)
    x[0, 5, 1] = 3.0
    out = mlp(torch.log1p(x))
    assert out.shape == (2, N_TOKENS, 16)
    assert torch.count_nonzero(out[1]) == 0 and torch.count_nonzero(out[0, 4]) == 0
    assert out[0, 5].abs().sum() > 0


def test_early_add_with_empty_expression_equals_morph_only_vit(settings):
    fused = tiny_model(settings["early_add_vits_ft_mlp_token"]).eval()
    morph = tiny_model(settings["morph_vits_ft"]).eval()
    morph.vit.load_state_dict(fused.vit.state_dict())
    morph.head.load_state_dict(fused.head.state_dict())
    with torch.no_grad():
        torch.nn.init.normal_(fused.expr.net[0].bias, std=1.0)
        batch = make_batch(zero_tokens=True)
        assert torch.equal(fused(batch), morph(batch))
        # and transcripts do change the prediction
        assert not torch.allclose(fused(make_batch()), morph(make_batch()))


def test_early_concat_sequence_shares_positional_embeddings(settings):
    model = tiny_model(settings["early_concat_vits_ft_mlp_token"]).eval()
    batch = make_batch()
    with torch.no_grad():
        seq = model.early_sequence(batch)
        assert seq.shape == (B, 1 + N_TOKENS + N_TOKENS, 32)
        img = model.vit.embed(batch["image"])
        assert torch.equal(seq[:, : 1 + N_TOKENS], img)
        expr = model.expr(torch.log1p(batch["tokens"])) + model.vit.vit.pos_embed[:, 1:]
        assert torch.allclose(seq[:, 1 + N_TOKENS:], expr)
        assert model(batch).shape == (B, T)


def test_late_token_fusion_is_mean_of_token_embeddings(settings):
    model = tiny_model(settings["late_add_vits_ft_mlp_token"]).eval()
    batch = make_batch()
    with torch.no_grad():
        z = model.embedding(batch)
        ref = model.vit(batch["image"]) + model.expr(torch.log1p(batch["tokens"])).mean(1)
        assert torch.allclose(z, ref, atol=1e-6)


def test_param_groups_split_backbone_and_head(settings):
    model = tiny_model(settings["early_add_vits_ft_mlp_token"])
    groups = {g["name"]: g for g in model.param_groups(1e-4, 1e-5)}
    assert groups["backbone"]["lr"] == 1e-5 and groups["head"]["lr"] == 1e-4
    vit_ids = {id(p) for p in model.vit.parameters()}
    assert {id(p) for p in groups["backbone"]["params"]} == vit_ids
    head_ids = {id(p) for p in groups["head"]["params"]}
    assert {id(p) for p in model.expr.parameters()} <= head_ids
    assert {id(p) for p in model.head.parameters()} <= head_ids
    frozen = tiny_model(settings["early_add_vits_fz_mlp_token"])
    assert [g["name"] for g in frozen.param_groups(1e-4, 1e-5)] == ["head"]


def test_input_normalisation_inside_the_model():
    vit = ViTEncoder(TINY.vit)
    img = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 224, 224, 3)
    x = vit.normalise(img)
    assert x.shape == (1, 3, 224, 224)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([-1.0, 1.0, 51 / 255 / 0.5 - 1.0]))


def test_grid_must_stay_14x14():
    with pytest.raises(InputError, match="14"):
        ViTEncoder({"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 112})


def test_local_weights_safetensors_and_torch(tmp_path):
    from safetensors.torch import save_file

    src = ViTEncoder(TINY.vit)
    sd = {k: v.contiguous() for k, v in src.vit.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "w.pt")
    for f in ("w.safetensors", "w.pt"):
        vit = ViTEncoder(TINY.vit, weights=tmp_path / f)
        assert vit.pretrained
        assert all(torch.equal(a, b) for a, b in zip(vit.vit.state_dict().values(), sd.values()))
    with pytest.raises(InputError, match="not found"):
        ViTEncoder(TINY.vit, weights=tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match="shape"):
        ViTEncoder({"embed_dim": 64, "depth": 1, "num_heads": 2}, weights=tmp_path / "w.safetensors")


def test_clip_model_and_loss(settings):
    for name in ("clip_token", "clip_tile"):
        torch.manual_seed(0)
        model = build_clip_model(settings[name], G, TINY)
        batch = make_batch(4)
        img, txt = model(batch)
        assert img.shape == txt.shape == (4, 128)
        assert torch.allclose(img.norm(dim=1), torch.ones(4), atol=1e-5)
        loss = clip_loss(img, txt, model.scale())
        loss.backward()
        assert model.logit_scale.grad is not None
        assert model.vit.vit.patch_embed.proj.weight.grad is not None
    assert abs(float(model.scale().detach()) - 1 / 0.07) < 1e-3
    e = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    assert clip_loss(e, e, torch.tensor(20.0)) < clip_loss(e, e.roll(1, 0), torch.tensor(20.0))
