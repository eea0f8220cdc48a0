"""Per-slide embeddings (rule slides_embed) and what fold jobs compute from them without holding the cohort:
the seeded bag and mean of each slide, bags read per batch, the slide PCA from a streamed covariance, the RNA
side streamed from expression.h5ad, ssGSEA in sample blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from morphomol.data.features import write_features
from morphomol.errors import InputError
from morphomol.studies.slides.bank import SlideBank, bag_rows, embed_slide, embed_slides, embedding_path

HALLMARK = Path(__file__).parent / "data" / "slides_gene_sets" / "h.all.v7.0.symbols.gmt"


def _stores(root: Path, n_tiles: list[int], dim: int = 24, seed: int = 0) -> tuple[list[str], list[Path], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    samples, paths, feats = [], [], []
    for i, n in enumerate(n_tiles):
        s = f"SL{i:02d}"
        f = (rng.normal(size=(n, dim)) * rng.uniform(0.5, 3.0, size=dim) + rng.normal(size=dim)).astype(np.float32)
        paths.append(write_features(root / "features" / f"{s}.zarr", f, encoder="vit_s", chunk_rows=64))
        samples.append(s)
        feats.append(f)
    return samples, paths, feats


def test_slide_embedding_is_the_mean_and_the_seeded_bag_of_the_features(tmp_path):
    samples, paths, feats = _stores(tmp_path, [700, 40])
    info = embed_slide(paths[0], tmp_path / "e" / "SL00.zarr", sample="SL00", max_tiles=512, seed=3)
    assert info == {"sample": "SL00", "n_tiles": 700, "n_bag": 512, "dim": 24}
    bank = SlideBank({"SL00": tmp_path / "e" / "SL00.zarr"}, ["SL00"])
    # the subset the fold jobs drew before the embeddings existed (seed + sample bytes, sorted rows)
    rng = np.random.default_rng([3, *b"SL00"])
    rows = np.sort(rng.choice(700, size=512, replace=False))
    np.testing.assert_array_equal(bag_rows(700, "SL00", max_tiles=512, seed=3), rows)
    np.testing.assert_array_equal(bank.bag(0), feats[0][rows].astype(np.float16))
    np.testing.assert_array_equal(bank.means()[0], feats[0].mean(axis=0))  # float32, over all tiles
    import zarr

    g = zarr.open_group(str(tmp_path / "e" / "SL00.zarr"), mode="r")
    np.testing.assert_array_equal(g["bag_index"][:], rows)
    assert g.attrs["n_tiles"] == 700 and g.attrs["features"] == str(paths[0]) and g["bag"].dtype == np.float16
    # a slide with fewer tiles keeps them all, in store order
    embed_slide(paths[1], tmp_path / "e" / "SL01.zarr", sample="SL01", max_tiles=512, seed=3)
    assert SlideBank({"SL01": tmp_path / "e" / "SL01.zarr"}, ["SL01"]).bag(0).shape == (40, 24)


def test_bank_pads_bags_to_the_cohort_bag_length_and_checks_its_inputs(tmp_path):
    samples, paths, feats = _stores(tmp_path, [30, 12, 50])
    out = embed_slides(features=paths, samples=samples, out_dir=tmp_path / "g0", max_tiles=32, seed=0)
    assert [r["n_bag"] for r in out] == [30, 12, 32]
    emb = {s: embedding_path(tmp_path / "g0", s) for s in samples}
    bank = SlideBank(emb, samples[::-1])
    assert bank.T == 32 and bank.samples == samples[::-1]
    bag, mask = bank.all_bags().read([1, 0])
    assert bag.shape == (2, 32, 24) and mask.sum(axis=1).tolist() == [12, 32]
    np.testing.assert_array_equal(bag[0, :12], feats[1].astype(np.float16).astype(np.float32))
    assert not bag[0, 12:].any()
    with pytest.raises(InputError, match="no slide embedding for 1 slide"):
        SlideBank({s: emb[s] for s in samples[:2]}, samples)
    with pytest.raises(InputError, match="not the embedding of slide SL00"):
        SlideBank({"SL00": emb["SL01"]}, ["SL00"])
    _stores(tmp_path / "wide", [5], dim=8)
    embed_slide(tmp_path / "wide" / "features" / "SL00.zarr", tmp_path / "w" / "SL09.zarr", sample="SL09", max_tiles=8)
    with pytest.raises(InputError, match="different dimensions"):
        SlideBank({**emb, "SL09": tmp_path / "w" / "SL09.zarr"}, [*samples, "SL09"])


def test_slide_pca_of_bags_from_the_streamed_covariance_equals_the_svd_of_the_stacked_tiles(tmp_path):
    from morphomol.studies.slides.bank import tile_covariance
    from morphomol.studies.slides.embed import SlidePca

    samples, paths, _ = _stores(tmp_path, [60, 45, 80, 33, 70], dim=12, seed=1)
    embed_slides(features=paths, samples=samples, out_dir=tmp_path / "g", max_tiles=64, seed=0)
    bank = SlideBank({s: embedding_path(tmp_path / "g", s) for s in samples}, samples)
    fit = bank.bags([0, 2, 3, 4])
    X = np.concatenate([bank.bag(i).astype(np.float64) for i in (0, 2, 3, 4)])  # what used to be stacked
    mean, cov, n = tile_covariance(fit, chunk_rows=50)  # several blocks
    assert n == len(X)
    np.testing.assert_allclose(mean, X.mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(X.T, bias=True), rtol=1e-10, atol=1e-12)
    pca = SlidePca(4)
    pca.SVD_MAX_VALUES = 0  # the streamed path, whatever the size
    pca.fit_bags(fit)
    sd = X.std(axis=0) + 1e-6
    np.testing.assert_allclose(pca.sd, sd, rtol=1e-10)
    _, _, Vt = np.linalg.svd((X - X.mean(axis=0)) / sd, full_matrices=False)
    np.testing.assert_allclose(np.abs(np.sum(pca.components * Vt[:4], axis=1)), 1.0, atol=1e-8)
    assert (pca.components[np.arange(4), np.abs(pca.components).argmax(axis=1)] > 0).all()  # signs fixed
    # few tiles: stacked and decomposed by SVD (as before the embeddings existed): the same axes up to sign
    small = SlidePca(4).fit_bags(fit)
    np.testing.assert_array_equal(small.components, Vt[:4])
    np.testing.assert_allclose(np.abs(np.sum(small.components * pca.components, axis=1)), 1.0, atol=1e-8)
    # bags read through the projection: real tiles projected, padding zero
    proj = fit.with_transform(pca.project, pca.dim)
    bag, mask = proj.read([2])  # slide SL03: 33 tiles in a bag of 64
    np.testing.assert_allclose(bag[0, :33], pca.project(bank.bag(3).astype(np.float32)), rtol=1e-6)
    assert bag.shape == (1, 64, 4) and mask[0].sum() == 33 and not bag[0, ~mask[0]].any()


def test_bags_read_per_batch_train_and_embed_like_bags_in_memory(tmp_path):
    from morphomol.config import default_sections
    from morphomol.studies.slides.align import AlignData, build_model, embed_data, val_loss

    samples, paths, _ = _stores(tmp_path, [20, 9, 15, 30, 12, 25], dim=10, seed=2)
    embed_slides(features=paths, samples=samples, out_dir=tmp_path / "g", max_tiles=16, seed=0)
    bank = SlideBank({s: embedding_path(tmp_path / "g", s) for s in samples}, samples)
    rna = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    bag, mask = bank.all_bags().read(np.arange(6))
    lazy = AlignData(samples, {"rna": rna}, bank.all_bags())
    eager = AlignData(samples, {"bag": bag, "mask": mask, "rna": rna})
    cfg = default_sections(slides={"align": {"hidden": 16, "proj_dim": 8}}).slides.align
    m1, m2 = (build_model(d, cfg, bag=True, seed=0) for d in (lazy, eager))
    np.testing.assert_allclose(m1.slide_mean.numpy(), m2.slide_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m1.slide_std.numpy(), m2.slide_std.numpy(), rtol=1e-5)
    m2.load_state_dict(m1.state_dict())
    for a, b in zip(embed_data(m1, lazy), embed_data(m2, eager), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert val_loss(m1, lazy) == pytest.approx(val_loss(m2, eager), rel=1e-5)
    assert lazy.subset(np.array([3, 1])).batch(np.array([0]))["mask"].sum() == 16  # slide SL03 (30 tiles -> 16)


# ------------------------------------------------------------------------------ RNA streamed from expression.h5ad
def _expression(tmp_path: Path, n: int = 40, g: int = 300) -> Path:
    from morphomol.studies.slides.config import RnaConfig
    from morphomol.studies.slides.genesets import read_gmt
    from morphomol.studies.slides.rna import prepare_rna

    genes = sorted({x for v in read_gmt(HALLMARK).values() for x in v})[:g]
    rng = np.random.default_rng(0)
    counts = pd.DataFrame(rng.negative_binomial(3, 0.05, size=(g, n)), index=genes, columns=[f"S{i}" for i in range(n)])
    counts.to_csv(tmp_path / "m.tsv", sep="\t")
    sheet = [{"sample_id": f"S{i}", "patient_id": f"P{i}", "cohort": "C"} for i in range(n)]
    out = tmp_path / "rna" / "expression.h5ad"
    prepare_rna(sheet=sheet, out_expression=out, out_preprocessing=tmp_path / "rna" / "p.json",
                out_genes=tmp_path / "rna" / "g.txt", cfg=RnaConfig(), matrix=tmp_path / "m.tsv")
    return out


def test_rna_pca_and_prompt_statistics_streamed_equal_the_in_memory_ones(tmp_path):
    from morphomol.studies.slides.embed import PcaRna
    from morphomol.studies.slides.rna import ExpressionMatrix, read_expression

    path = _expression(tmp_path)
    L = read_expression(path).to_numpy()
    expr = ExpressionMatrix(path, chunk_rows=7)
    rows = np.concatenate([np.arange(0, 40, 3), np.arange(1, 40, 4)])  # fit then val rows, as in a fold
    mean, var = expr.row_stats(rows)
    np.testing.assert_array_equal(mean, L[rows].mean(axis=0))  # bit for bit: same order of additions
    np.testing.assert_array_equal(np.sqrt(var), L[rows].std(axis=0))
    a = PcaRna(5, 100, 1.0).fit(L[rows], expr.genes)
    b = PcaRna(5, 100, 1.0).fit_matrix(expr, rows)
    np.testing.assert_array_equal(a.idx, b.idx)
    np.testing.assert_array_equal(a.components, b.components)
    np.testing.assert_array_equal(a.transform(L), b.transform_matrix(expr))


def test_ssgsea_in_sample_blocks_gives_the_scores_of_the_whole_matrix(tmp_path):
    from morphomol.studies.slides.genesets import read_gmt, ssgsea, ssgsea_matrix
    from morphomol.studies.slides.rna import ExpressionMatrix, read_expression

    path = _expression(tmp_path, n=11)
    sets = {k: v for k, v in list(read_gmt(HALLMARK).items())[:6]}
    whole = ssgsea(read_expression(path).T, sets)
    blocks = ssgsea_matrix(ExpressionMatrix(path, chunk_rows=4), sets)
    pd.testing.assert_frame_equal(blocks, whole, check_exact=True, check_names=False)
    assert blocks.index.name == "sample_id"


def test_expression_must_be_the_dense_table_of_the_rna_rule(tmp_path):
    import anndata as ad
    import scipy.sparse as sp

    from morphomol.studies.slides.rna import ExpressionMatrix

    ad.AnnData(sp.csr_matrix(np.ones((3, 2), np.float32))).write_h5ad(tmp_path / "x.h5ad")
    with pytest.raises(InputError, match="X is not a dense matrix"):
        ExpressionMatrix(tmp_path / "x.h5ad")
    with pytest.raises(InputError, match="expression table not found"):
        ExpressionMatrix(tmp_path / "missing.h5ad")


def test_setting_inputs_come_from_the_embeddings(tmp_path):
    """mean: the (N, D) means; abmil: bags read lazily; abmil_frozen: a frozen ABMIL over the bags, in batches."""
    from safetensors.torch import save_file

    from morphomol.config import default_sections
    from morphomol.studies.slides.data import make_inputs
    from morphomol.studies.slides.models import GatedABMIL, frozen_slide_vectors

    samples, paths, feats = _stores(tmp_path, [20, 9, 15, 30, 12] * 14, dim=10, seed=3)  # 70 slides
    embed_slides(features=paths, samples=samples, out_dir=tmp_path / "g", max_tiles=16, seed=0)
    emb = {s: embedding_path(tmp_path / "g", s) for s in samples}
    pool = GatedABMIL(10, 8, 4, 0.0)
    save_file({k: v.contiguous() for k, v in pool.state_dict().items()}, str(tmp_path / "frozen.safetensors"))
    cfg = default_sections(slides={"poolings": ["mean", "abmil", "abmil_frozen"],
                                   "slide_encoder_weights": {"abmil_frozen": str(tmp_path / "frozen.safetensors")}}).slides
    mean = make_inputs("mean", emb, samples, cfg=cfg)
    np.testing.assert_array_equal(mean.slide, np.stack([f.mean(axis=0) for f in feats]))
    abmil = make_inputs("abmil", emb, samples, cfg=cfg)
    assert abmil.bag and abmil.slide is None and len(abmil.bags) == 70
    frozen = make_inputs("abmil_frozen", emb, samples, cfg=cfg)
    bag, mask = abmil.bags.read(np.arange(70))
    np.testing.assert_allclose(frozen.slide, frozen_slide_vectors(pool, bag, mask), rtol=1e-5, atol=1e-6)


def test_an_embedding_in_another_zarr_layout_is_read_through_zarr(tmp_path):
    """Bags written with a compressor (not the writer's plain single chunk) still read, through zarr itself."""
    import zarr

    rng = np.random.default_rng(0)
    bag = rng.normal(size=(40, 6)).astype(np.float16)
    g = zarr.open_group(str(tmp_path / "S.zarr"), mode="w")
    g.create_array("bag", data=bag, chunks=(16, 6))  # default compressor, several chunks
    g.create_array("mean", data=bag.astype(np.float32).mean(axis=0))
    g.create_array("bag_index", data=np.arange(40))
    g.attrs.update({"format": "morphomol-slide-embedding/1", "sample": "S", "n_tiles": 40})
    bank = SlideBank({"S": tmp_path / "S.zarr"}, ["S"])
    assert bank._bag[0].chunk is None
    np.testing.assert_array_equal(bank.bag(0), bag)
    np.testing.assert_array_equal(bank.means()[0], bag.astype(np.float32).mean(axis=0))
