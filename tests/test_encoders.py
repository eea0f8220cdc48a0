"""Encoder registry: tiny random instances of every architecture, saved in every supported weight
format and loaded back through the registry; clear errors for wrong, missing or broken weights."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from morphomol import encoders as E
from morphomol.encoders import create_encoder, list_encoders, list_encoders_table, save_weights
from morphomol.encoders.timm_vit import build_timm_vit
from morphomol.encoders.weights import adapt_state_dict, load_timm_vit_weights
from morphomol.errors import InputError

REPO = Path(__file__).resolve().parents[1]

TINY: dict[str, dict] = {
    "vit_s": dict(embed_dim=32, depth=2, num_heads=2),
    "uni": dict(embed_dim=32, depth=2, num_heads=2),
    "uni2h": dict(embed_dim=48, depth=2, num_heads=2),
    "conch": dict(embed_dim=32, depth=2, num_heads=2, contrast_dim=24, attn_pooler_heads=2),
    "phikon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "phikon2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2),
    "loki": dict(embed_dim=24, width=32, layers=2, head_width=16, attn_pooler_queries=8, attn_pooler_heads=2),
}
HF_LAYOUT = {"phikon", "phikon2"}


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)


def _feats(enc, images) -> torch.Tensor:
    with torch.inference_mode():
        return enc(images)


def test_registry_lists_every_architecture():
    names = {s.name for s in list_encoders()}
    assert {"vit_s", "uni", "uni2h", "phikon", "loki", "conch", "geneformer"} <= names
    table = list_encoders_table({"uni": {"weights": "/nonexistent/uni.safetensors"}})
    for n in names:
        assert n in table
    assert "/nonexistent/uni.safetensors (missing)" in table
    assert "random-init" in table  # vit_s runs without weights
    spec = E.get_spec("uni2h")
    assert spec.requires_weights and spec.embed_dim == 1536 and spec.kind == "image"
    assert E.get_spec("geneformer").kind == "expression"


@pytest.mark.parametrize("name", sorted(TINY))
def test_roundtrip_all_formats(name, images, tmp_path):
    ov = TINY[name]
    ref = create_encoder(name, allow_random=True, seed=3, **ov)
    f_ref = _feats(ref, images)
    assert f_ref.shape == (2, ref.dim) and torch.isfinite(f_ref).all()
    # the input layout does not matter: (B,H,W,3) == (B,3,H,W)
    f_nchw = _feats(ref, np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    torch.testing.assert_close(f_ref, f_nchw)
    paths = [tmp_path / "w.safetensors", tmp_path / "w.pt", tmp_path / "w.bin", tmp_path / "hfdir"]
    for p in paths:
        save_weights(ref, p)
        kwargs = {} if (name in HF_LAYOUT and p.is_dir()) else ov  # HF dirs carry their geometry
        enc = create_encoder(name, weights=p, **kwargs)
        assert enc.weights_id == E.weights_sha256(p)
        torch.testing.assert_close(_feats(enc, images), f_ref, rtol=0, atol=0, msg=f"{name} from {p.name}")
    # a different random init gives different features: the weights really were loaded
    other = create_encoder(name, allow_random=True, seed=4, **ov)
    assert not torch.allclose(_feats(other, images), f_ref)


def test_vit_s_random_init_is_deterministic(images):
    a = create_encoder("vit_s", **TINY["vit_s"])
    b = create_encoder("vit_s", **TINY["vit_s"])
    assert a.weights_id == "random-init:seed=0"
    torch.testing.assert_close(_feats(a, images), _feats(b, images), rtol=0, atol=0)
    assert all(not p.requires_grad for p in a.parameters()) and not a.training
    c = create_encoder("vit_s", seed=1, **TINY["vit_s"])
    assert not torch.allclose(_feats(a, images), _feats(c, images))


def test_vit_s_default_geometry_is_vit_small():
    with torch.device("meta"):
        spec = E.get_spec("vit_s")
        enc = spec.builder(spec, None, {}, 0)
    assert enc.dim == 384
    assert enc.model.patch_embed.proj.kernel_size == (16, 16)
    assert len(enc.model.blocks) == 12 and enc.model.blocks[0].attn.num_heads == 6


def test_uni2h_layout_registers_and_swiglu(images):
    enc = create_encoder("uni2h", allow_random=True, **TINY["uni2h"])
    m = enc.model
    assert m.num_prefix_tokens == 9 and m.num_reg_tokens == 8  # CLS + 8 registers
    assert m.no_embed_class and m.pos_embed.shape[1] == 256  # 16x16 patches of 14 px, no prefix pos
    assert type(m.blocks[0].mlp).__name__ == "GluMlp"
    assert isinstance(m.blocks[0].mlp.act, torch.nn.SiLU)
    assert m.blocks[0].ls1.gamma.detach().allclose(torch.full((48,), 1e-5))
    assert enc.forward_tokens(images).shape == (2, 256, 48)


def test_uni_layout_and_pooling(images):
    enc = create_encoder("uni", allow_random=True, **TINY["uni"])
    assert enc.model.blocks[0].ls1.gamma.detach().allclose(torch.full((32,), 1e-5))
    assert enc.model.dynamic_img_size
    tokens = enc.model.forward_features(enc.preprocess(images))
    torch.testing.assert_close(_feats(enc, images), tokens[:, 0])
    both = create_encoder("uni", allow_random=True, pooling="cls+mean", **TINY["uni"])
    assert both.dim == 64
    torch.testing.assert_close(_feats(both, images)[:, 32:], tokens[:, 1:].mean(1))


def test_published_checkpoint_layouts_load(images, tmp_path):
    # timm checkpoint with a classification head (e.g. an augreg ViT-S): the head is ignored
    vit = create_encoder("vit_s", **TINY["vit_s"], seed=5)
    sd = dict(vit.model.state_dict())
    sd["head.weight"] = torch.zeros(10, 32)
    sd["head.bias"] = torch.zeros(10)
    torch.save(sd, tmp_path / "augreg.pth")
    loaded = create_encoder("vit_s", tmp_path / "augreg.pth", **TINY["vit_s"])
    torch.testing.assert_close(_feats(loaded, images), _feats(vit, images))

    # CONCH pytorch_model.bin: whole CoCa (visual.*, text.*), captioning pooler included
    conch = create_encoder("conch", allow_random=True, seed=2, **TINY["conch"])
    full = {f"visual.{k}": v for k, v in conch.model.state_dict().items()}
    full["visual.attn_pool_caption.query"] = torch.zeros(8, 24)
    full["visual.ln_caption.weight"] = torch.ones(24)
    full["text.token_embedding.weight"] = torch.zeros(5, 24)
    full["logit_scale"] = torch.tensor(1.0)
    (tmp_path / "conch").mkdir()
    torch.save(full, tmp_path / "conch" / "pytorch_model.bin")
    loaded = create_encoder("conch", tmp_path / "conch", **TINY["conch"])
    torch.testing.assert_close(_feats(loaded, images), _feats(conch, images))
    proj = create_encoder("conch", tmp_path / "conch", pooling="proj", **TINY["conch"])
    torch.testing.assert_close(_feats(proj, images), _feats(conch, images) @ conch.model.proj_contrast)


def test_loki_is_open_clip_coca_visual(images, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    vis = dict(image_size=224, layers=2, width=32, patch_size=14, head_width=16, attentional_pool=True,
               attn_pooler_heads=2, attn_pooler_queries=8, output_tokens=True)
    txt = dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1, embed_cls=True, output_tokens=True)
    mm = dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1, attn_pooler_heads=2)
    torch.manual_seed(0)
    coca = open_clip.create_model("coca_ViT-L-14", pretrained=None, embed_dim=24, vision_cfg=vis,
                                  text_cfg=txt, multimodal_cfg=mm).eval()
    # an open_clip training checkpoint: {"epoch", "state_dict": {"module.visual.*", "module.text.*"}}
    ckpt = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in coca.state_dict().items()}}
    torch.save(ckpt, tmp_path / "epoch_3.pt")
    enc = create_encoder("loki", tmp_path / "epoch_3.pt", **TINY["loki"])
    expected_keys = {k[len("visual."):] for k in coca.state_dict() if k.startswith("visual.")}
    assert set(enc.model.state_dict()) == expected_keys
    with torch.inference_mode():
        x = enc.preprocess(images)
        want = coca.encode_image(x, normalize=False)
    torch.testing.assert_close(_feats(enc, images), want)


# ------------------------------------------------------------------------------- bad weights


def test_missing_and_required_weights(tmp_path):
    with pytest.raises(InputError, match=r"encoders\.uni\.weights"):
        create_encoder("uni")
    with pytest.raises(InputError, match="weights not found") as exc:
        create_encoder("uni", tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(exc.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="model.safetensors") as exc:
        create_encoder("uni", tmp_path / "empty", **TINY["uni"])
    assert "empty" in str(exc.value)
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(InputError, match="unsupported weights format"):
        create_encoder("uni", tmp_path / "w.txt")
    with pytest.raises(InputError, match="unknown encoder"):
        create_encoder("resnet9000")


def test_wrong_weights_name_keys_and_shapes(tmp_path):
    small = create_encoder("vit_s", **TINY["vit_s"])
    save_weights(small, tmp_path / "small.safetensors")
    with pytest.raises(InputError, match="mismatched shapes") as exc:
        create_encoder("vit_s", tmp_path / "small.safetensors", embed_dim=64, depth=2, num_heads=2)
    msg = str(exc.value)
    assert "small.safetensors" in msg and "cls_token" in msg and "(1, 1, 32)" in msg
    with pytest.raises(InputError, match="missing keys: blocks.2") as exc:
        create_encoder("vit_s", tmp_path / "small.safetensors", embed_dim=32, depth=3, num_heads=2)
    # weights of another architecture: unexpected keys are listed
    phikon = create_encoder("phikon", allow_random=True, **TINY["phikon"])
    save_weights(phikon, tmp_path / "phikon.safetensors")
    with pytest.raises(InputError, match="unexpected keys: embeddings"):
        create_encoder("vit_s", tmp_path / "phikon.safetensors", **TINY["vit_s"])


def test_truncated_and_unsafe_files(tmp_path):
    small = create_encoder("vit_s", **TINY["vit_s"])
    p = save_weights(small, tmp_path / "w.safetensors")
    data = p.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated") as exc:
        create_encoder("vit_s", tmp_path / "cut.safetensors", **TINY["vit_s"])
    assert "cut.safetensors" in str(exc.value)
    torch.save(small.model.state_dict(), tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match="cut.pt"):
        create_encoder("vit_s", tmp_path / "cut.pt", **TINY["vit_s"])

    # a pickle that would run code is refused by torch.load(weights_only=True)
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(InputError, match="weights_only"):
        create_encoder("vit_s", tmp_path / "evil.pt", **TINY["vit_s"])
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "meta.pt")
    with pytest.raises(InputError, match="state dict"):
        create_encoder("vit_s", tmp_path / "meta.pt", **TINY["vit_s"])


def test_sharded_safetensors_directory(images, tmp_path):
    from safetensors.torch import save_file

    enc = create_encoder("vit_s", **TINY["vit_s"], seed=9)
    sd = {k: v.contiguous() for k, v in enc.model.state_dict().items()}
    keys = sorted(sd)
    half = len(keys) // 2
    d = tmp_path / "sharded"
    d.mkdir()
    save_file({k: sd[k] for k in keys[:half]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[half:]}, str(d / "model-00002-of-00002.safetensors"))
    wm = {k: "model-00001-of-00002.safetensors" for k in keys[:half]}
    wm.update({k: "model-00002-of-00002.safetensors" for k in keys[half:]})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    loaded = create_encoder("vit_s", d, **TINY["vit_s"])
    torch.testing.assert_close(_feats(loaded, images), _feats(enc, images))


def test_register_custom_encoder(images, tmp_path):
    spec = E.EncoderSpec(
        name="test_tiny_vit", kind="image", architecture="timm vit_tiny_patch16_224",
        model_name="vit_tiny_patch16_224", ignore_prefixes=("head.", "fc_norm."),
        weight_formats=("safetensors",), input_size=112, mean=E.IMAGENET_MEAN, std=E.IMAGENET_STD,
        embed_dim=16, pooling="mean", poolings=("cls", "mean"), requires_weights=False,
        builder=build_timm_vit,
        defaults={"embed_dim": 16, "depth": 1, "num_heads": 2, "img_size": 112},
    )
    E.register_encoder(spec, overwrite=True)
    try:
        with pytest.raises(ValueError, match="already registered"):
            E.register_encoder(spec)
        enc = create_encoder("test_tiny_vit")
        assert _feats(enc, images).shape == (2, 16)  # 224 px tiles are resized to 112 inside
        torch.save(enc.model.state_dict(), tmp_path / "w.pt")
        with pytest.raises(InputError, match="unsupported weights format 'torch'"):
            create_encoder("test_tiny_vit", tmp_path / "w.pt")
    finally:
        E.unregister_encoder("test_tiny_vit")
    assert "test_tiny_vit" not in {s.name for s in list_encoders()}


def test_register_encoder_decorator(images):
    calls = []

    @E.register_encoder(name="test_deco_a", kind="image", architecture="timm vit_tiny_patch16_224",
                        model_name="vit_tiny_patch16_224", input_size=224, mean=E.HALF, std=E.HALF, embed_dim=16,
                        pooling="cls", requires_weights=False, defaults={"embed_dim": 16, "depth": 1, "num_heads": 2})
    @E.register_encoder(name="test_deco_b", kind="image", architecture="timm vit_tiny_patch16_224",
                        model_name="vit_tiny_patch16_224", input_size=224, mean=E.HALF, std=E.HALF, embed_dim=16,
                        pooling="cls", requires_weights=True, defaults={"embed_dim": 16, "depth": 1, "num_heads": 2})
    def build(spec, weights, overrides, seed, *, overrides_field=None):
        calls.append((spec.name, overrides_field))
        return build_timm_vit(spec, weights, overrides, seed, overrides_field=overrides_field)

    try:
        assert build.__name__ == "build"  # the decorator returns the builder unchanged
        a, b = E.get_spec("test_deco_a"), E.get_spec("test_deco_b")
        assert a.builder is build and b.builder is build and b.requires_weights
        assert E.encoder_kind("test_deco_a") == "image"
        assert "test_deco_a" in list_encoders_table() and "test_deco_b" in list_encoders_table()
        enc = create_encoder("test_deco_a", seed=1)
        assert _feats(enc, images).shape == (2, 16)
        assert calls == [("test_deco_a", "encoders.test_deco_a.overrides")]
        with pytest.raises(InputError, match=r"encoders\.test_deco_b\.weights"):
            create_encoder("test_deco_b")
        create_encoder("test_deco_b", allow_random=True, overrides_field="model.vit")
        assert calls[-1] == ("test_deco_b", "model.vit")
        with pytest.raises(ValueError, match="already registered"):
            E.register_encoder(name="test_deco_a", kind="image", architecture="x", input_size=1, mean=E.HALF,
                               std=E.HALF, embed_dim=1, pooling="cls", requires_weights=False)(build)
        with pytest.raises(TypeError, match="builder"):
            E.register_encoder(name="x", builder=build)
    finally:
        E.unregister_encoder("test_deco_a")
        E.unregister_encoder("test_deco_b")


def test_registry_import_is_torch_free():
    code = ("import sys\n"
            "for m in ('torch', 'timm', 'transformers', 'open_clip'): sys.modules[m] = None\n"
            "import morphomol.encoders as e\n"
            "import morphomol.encoders.registry as r\n"
            "import morphomol.encoders.weights\n"
            "assert r.get_spec('uni2h').requires_weights and e.encoder_kind('geneformer') == 'expression'\n"
            "print(len(e.list_encoders()))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")}, cwd=str(REPO))
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip()) == len(list_encoders()) >= 8


def test_overrides_field_names_the_config_key():
    with pytest.raises(InputError, match=r"encoders\.vit_s\.overrides"):
        create_encoder("vit_s", embed_dim=30, depth=1, num_heads=4)  # 30 is not divisible by 4
    with pytest.raises(InputError, match=r"model\.vit") as exc:
        create_encoder("vit_s", embed_dim=30, depth=1, num_heads=4, overrides_field="model.vit")
    assert "encoders.vit_s" not in str(exc.value)
    with pytest.raises(InputError, match=r"encoders\.loki\.overrides"):
        create_encoder("loki", allow_random=True, no_such_option=1)


# ----------------------------------------------------------------- one weight loader


def _timm_vit(seed: int) -> torch.nn.Module:
    """The fusion model's ViT: timm vit_small_patch16_224 with num_classes=0, as models.py builds it."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **TINY["vit_s"]).eval()


def test_adapt_state_dict_key_rules():
    t = torch.zeros(1)
    assert set(adapt_state_dict({"module.a": t, "module.b.c": t})) == {"a", "b.c"}
    # nested wrappers (DDP around a Lightning module) are all stripped
    assert set(adapt_state_dict({"module.model.backbone.a": t, "module.model.backbone.b": t})) == {"a", "b"}
    # a prefix only some keys share is part of the key names
    assert set(adapt_state_dict({"encoder.a": t, "embeddings.b": t})) == {"encoder.a", "embeddings.b"}
    sd = {"module.visual.a": t, "module.text.b": t, "module.logit_scale": t}
    assert set(adapt_state_dict(sd, select_prefix=("visual.",))) == {"a"}
    assert set(adapt_state_dict({"vit.a": t, "head.w": t}, ignore_prefixes=("head.",))) == {"vit.a"}


def test_training_vit_and_vit_s_features_load_the_same_file(images, tmp_path):
    src = create_encoder("vit_s", seed=11, **TINY["vit_s"])
    sd = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    from safetensors.torch import save_file

    # a DDP-wrapped safetensors file with a classification head, and a plain torch file
    save_file({**{f"module.{k}": v for k, v in sd.items()}, "module.head.weight": torch.zeros(3, 32),
               "module.head.bias": torch.zeros(3)}, str(tmp_path / "ddp.safetensors"))
    torch.save(sd, tmp_path / "plain.pt")
    for path in (tmp_path / "ddp.safetensors", tmp_path / "plain.pt"):
        feat_enc = create_encoder("vit_s", path, **TINY["vit_s"])
        vit = _timm_vit(seed=99)
        assert load_timm_vit_weights(vit, path) == path
        a, b = feat_enc.model.state_dict(), vit.state_dict()
        assert set(a) == set(b)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{path.name}: {k}")
        with torch.inference_mode():  # the training ViT's CLS = the vit_s feature
            want = _feats(feat_enc, images)
            got = vit.forward_head(vit.forward_features(feat_enc.preprocess(images)), pre_logits=True)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_load_timm_vit_weights_errors(tmp_path):
    with pytest.raises(InputError, match="weights not found") as exc:
        load_timm_vit_weights(_timm_vit(0), tmp_path / "nope.safetensors")
    assert "encoders.vit_s.weights" in str(exc.value) and "nope.safetensors" in str(exc.value)
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(InputError, match="unsupported weights format"):
        load_timm_vit_weights(_timm_vit(0), tmp_path / "w.txt")
    small = create_encoder("vit_s", **TINY["vit_s"])
    save_weights(small, tmp_path / "small.safetensors")
    import timm

    big = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, embed_dim=64, depth=2,
                            num_heads=2)
    with pytest.raises(InputError, match="mismatched shapes") as exc:
        load_timm_vit_weights(big, tmp_path / "small.safetensors", field="model.vit")
    assert "small.safetensors" in str(exc.value) and "model.vit" in str(exc.value)
    # unexpected keys are an error, as in the feature encoder (no silent partial load)
    torch.save({**small.model.state_dict(), "extra.weight": torch.zeros(2)}, tmp_path / "extra.pt")
    with pytest.raises(InputError, match="unexpected keys: extra.weight"):
        load_timm_vit_weights(_timm_vit(0), tmp_path / "extra.pt")
    with pytest.raises(InputError, match="unexpected keys: extra.weight"):
        create_encoder("vit_s", tmp_path / "extra.pt", **TINY["vit_s"])


# -------------------------------------------------------------------------------- geneformer

GF_GENES = ["CD3E", "MS4A1", "EPCAM", "PTPRC", "NOTINVOCAB"]


def _write_geneformer(dirpath: Path, *, seed: int = 0, fmt: str = "safetensors", masked_lm: bool = False,
                      pickles: bool = False) -> Path:
    from transformers import BertConfig, BertForMaskedLM, BertModel

    cfg = BertConfig(vocab_size=12, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=6, pad_token_id=0)
    torch.manual_seed(seed)
    model = (BertForMaskedLM if masked_lm else BertModel)(cfg)
    dirpath.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(str(dirpath), safe_serialization=True)
    else:
        cfg.to_json_file(str(dirpath / "config.json"))
        torch.save(model.state_dict(), dirpath / "pytorch_model.bin")
    tokens = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3,
              "ENSG01": 4, "ENSG02": 5, "ENSG03": 6, "ENSG04": 7}
    medians = {"ENSG01": 1.0, "ENSG02": 0.1, "ENSG03": 2.0, "ENSG04": 1.0}
    names = {"CD3E": "ENSG01", "MS4A1": "ENSG02", "EPCAM": "ENSG03", "PTPRC": "ENSG04"}
    for stem, obj in (("token_dictionary", tokens), ("gene_median_dictionary", medians), ("gene_name_id_dict", names)):
        if pickles:
            with open(dirpath / f"{stem}.pkl", "wb") as f:
                pickle.dump({k: (np.float64(v) if stem == "gene_median_dictionary" else v) for k, v in obj.items()}, f)
        else:
            (dirpath / f"{stem}.json").write_text(json.dumps(obj))
    return dirpath


def test_geneformer_rank_value_tokens_and_pooling(tmp_path):
    d = _write_geneformer(tmp_path / "gf")
    enc = create_encoder("geneformer", d)
    assert enc.spec.kind == "expression" and enc.dim == 16 and enc.max_len == 6
    counts = np.array([
        [10, 2, 4, 0, 50],   # /66 total: CD3E 10/1, MS4A1 2/0.1, EPCAM 4/2 -> MS4A1, CD3E, EPCAM
        [0, 0, 0, 0, 7],     # nothing in the vocabulary -> just <cls> <eos>
        [1, 1, 8, 2, 0],     # EPCAM 4, MS4A1 10, PTPRC 2, CD3E 1 -> top 4 = budget (6 - 2 specials)
    ])
    ids, mask = enc.tokenize(counts, GF_GENES)
    assert ids[0, :5].tolist() == [2, 5, 4, 6, 3] and mask[0].tolist() == [1, 1, 1, 1, 1, 0]
    assert ids[1, :2].tolist() == [2, 3] and mask[1].sum() == 2
    assert ids[2].tolist() == [2, 5, 6, 7, 4, 3]
    emb = enc(counts, GF_GENES)
    assert emb.shape == (3, 16) and torch.isfinite(emb).all()
    with torch.inference_mode():
        hidden = enc.model(input_ids=ids[:1, :5], attention_mask=mask[:1, :5]).last_hidden_state
    torch.testing.assert_close(emb[0], hidden[0, 1:4].mean(0))  # mean over gene tokens only
    # column order does not matter, only which gene each column is
    perm = [4, 3, 2, 1, 0]
    torch.testing.assert_close(enc(counts[:, perm], [GF_GENES[i] for i in perm]), emb)
    with pytest.raises(InputError, match="columns"):
        enc(counts[:, :3], GF_GENES)


def test_geneformer_formats_and_errors(tmp_path):
    counts = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    ref = create_encoder("geneformer", _write_geneformer(tmp_path / "a", seed=1))(counts, GF_GENES)
    for kw in (dict(fmt="bin"), dict(masked_lm=False, pickles=True)):
        d = _write_geneformer(tmp_path / f"b{len(kw)}{kw.get('fmt', '')}{kw.get('pickles', '')}", seed=1, **kw)
        torch.testing.assert_close(create_encoder("geneformer", d)(counts, GF_GENES), ref)
    # a BertForMaskedLM checkpoint (bert.* + cls.*), as Geneformer ships, loads too
    mlm = create_encoder("geneformer", _write_geneformer(tmp_path / "mlm", seed=2, masked_lm=True))
    assert mlm(counts, GF_GENES).shape == (2, 16)
    with pytest.raises(InputError, match="directory"):
        create_encoder("geneformer")
    d = _write_geneformer(tmp_path / "nodict", seed=1)
    (d / "token_dictionary.json").unlink()
    with pytest.raises(InputError, match="token_dictionary.json"):
        create_encoder("geneformer", d)
    d = _write_geneformer(tmp_path / "evil", seed=1)
    (d / "gene_median_dictionary.json").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with open(d / "gene_median_dictionary.pkl", "wb") as f:
        pickle.dump({"ENSG01": Evil()}, f)
    with pytest.raises(InputError, match="not allowed"):
        create_encoder("geneformer", d)
    enc = create_encoder("geneformer", tmp_path / "a")
    with pytest.raises(InputError, match="vocabulary"):
        enc(np.ones((1, 2)), ["FOO", "BAR"])
