"""The cells study without the LLM: label map, templates and schedule, cell sentences, donor-grouped folds,
ingest of AnnData (the real pbmc68k_reduced fixture) and Xenium cells (a real 10x cell matrix), baselines,
the base-model directory checks and the cohort pre-flight checks. Each bad input is one InputError and
leaves nothing written."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from morphomol.config import default_sections
from morphomol.errors import InputError
from morphomol.studies.cells.folds import (
    FoldSentences,
    check_donor_fold,
    make_folds,
    read_donor_folds,
    read_fold,
    write_fold,
    write_folds,
)
from morphomol.studies.cells.ingest import build_units, read_10x_h5
from morphomol.studies.cells.labels import LabelMap
from morphomol.studies.cells.modelfiles import check_model_dir
from morphomol.studies.cells.prompts import (
    enabled_tasks,
    load_templates,
    render,
    task_weights,
    weight_at,
)
from morphomol.studies.cells.sentences import (
    cell_sentences,
    log_normalise,
    select_hvg,
    select_hvg_blocks,
    sentence_strings,
)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
TEMPLATES = REPO / "config" / "experiments" / "cells.yaml"
PBMC_MAP = """\
CD14+ Monocyte: []
CD19+ B: []
CD34+: []
CD4+/CD25 T Reg: []
CD4+/CD45RA+/CD25- Naive T: []
CD4+/CD45RO+ Memory: []
CD56+ NK: []
CD8+ Cytotoxic T: []
CD8+/CD45RA+ Naive Cytotoxic: []
Dendritic: []
"""


def cells_cfg(**over):
    return default_sections(cells=over).cells


# ------------------------------------------------------------------------------ labels
def test_label_map_normalises_aliases_and_lists_unknown_labels(tmp_path):
    p = tmp_path / "labels.yaml"
    p.write_text("T cell: [CD3+ T, t_cell]\nB cell: [B]\n_drop: [Unassigned]\n")
    lm = LabelMap.read(p)
    assert lm.labels == ("B cell", "T cell")
    assert lm.normalise(["cd3+  t", "T CELL", "b", "Unassigned"]) == ["T cell", "T cell", "B cell", None]
    with pytest.raises(InputError) as e:
        lm.normalise(["B", "NK", "NK", "Mono"], file="x.h5ad", field="obs/cell_type")
    assert "'Mono' (1 cells)" in e.value.message and "'NK' (2 cells)" in e.value.message
    assert "x.h5ad" in e.value.message and "obs/cell_type" in e.value.message
    with pytest.raises(InputError, match="without a label"):
        lm.normalise(["B", None])
    # free text back to labels: exact, alias, longest prefix; nothing named -> None
    assert lm.parse("T cell") == "T cell" and lm.parse(" b ") == "B cell" and lm.parse("T cell CD3D") == "T cell"
    assert lm.parse("macrophage") is None and lm.parse("") is None


def test_label_map_rejects_conflicts(tmp_path):
    p = tmp_path / "labels.yaml"
    p.write_text("T cell: [X]\nB cell: [x]\n")
    with pytest.raises(InputError, match="maps to both"):
        LabelMap.read(p)
    p.write_text("T cell: []\n")
    with pytest.raises(InputError, match="at least two"):
        LabelMap.read(p)


# ------------------------------------------------------------------------------ templates, schedule
def test_templates_need_their_placeholders(tmp_path):
    tpl = load_templates(TEMPLATES)
    assert set(tpl) == {"gene_to_type", "type_to_genes", "image_to_genes", "image_to_type", "image_genes_to_type"}
    assert all(len(v) >= 2 for v in tpl.values())  # several paraphrases per task
    txt = render(tpl["gene_to_type"][0].model_input, cell_sentence="CD3D CD3E", num_genes=2, organism="Homo sapiens")
    assert "CD3D CD3E" in txt and "{" not in txt
    bad = tmp_path / "t.yaml"
    bad.write_text("templates:\n  gene_to_type:\n    - {model_input: 'What type? {cell_type}', response: '{cell_type}'}\n")
    with pytest.raises(InputError, match="missing placeholder"):
        load_templates(bad, ["gene_to_type"])
    bad.write_text("templates:\n  gene_to_type:\n"
                   "    - {model_input: '{cell_sentence} {cell_type}?', response: '{cell_type}'}\n")
    with pytest.raises(InputError, match="not allowed"):
        load_templates(bad, ["gene_to_type"])
    bad.write_text("templates:\n  gene_to_type:\n    - {model_input: '{cell_sentence} {tissue}', response: '{cell_type}'}\n")
    with pytest.raises(InputError, match="unknown placeholder"):
        load_templates(bad, ["gene_to_type"])
    with pytest.raises(InputError, match="no templates for task 'type_to_genes'"):
        load_templates(_only_gene_to_type(tmp_path), ["type_to_genes"])


def _only_gene_to_type(tmp_path):
    p = tmp_path / "only.yaml"
    p.write_text("templates:\n  gene_to_type:\n    - {model_input: '{cell_sentence}', response: '{cell_type}'}\n")
    return p


def test_task_ratio_schedule_interpolates_and_normalises():
    sched = {"gene_to_type": [[0, 1.0], [1, 3.0]], "type_to_genes": [[0, 1.0], [1, 1.0]], "image_to_type": [[0, 0], [1, 0]]}
    assert enabled_tasks(sched) == ["gene_to_type", "type_to_genes"]
    assert weight_at(sched["gene_to_type"], 0.5) == pytest.approx(2.0)
    both = ["gene_to_type", "type_to_genes"]
    w0, w1 = task_weights(sched, 0.0, both), task_weights(sched, 1.0, both)
    assert w0 == pytest.approx({"gene_to_type": 0.5, "type_to_genes": 0.5})
    assert w1 == pytest.approx({"gene_to_type": 0.75, "type_to_genes": 0.25})
    with pytest.raises(InputError):
        task_weights({"image_to_type": [[0, 1.0]]}, 0.3, ["gene_to_type"])


def test_sampler_is_reproducible_per_step_and_respects_images():
    pytest.importorskip("torch")
    from morphomol.studies.cells.examples import TaskSampler

    t = pd.DataFrame({"partition": ["fit"] * 6 + ["val"] * 2,
                      "has_image": [True, False, False, True, False, False, True, True]})
    sched = {"gene_to_type": [[0, 1.0], [1, 0.0]], "image_to_type": [[0, 0.0], [1, 1.0]]}
    s = TaskSampler(t, sched, {"gene_to_type": 3, "image_to_type": 2}, seed=7, steps=101)
    a, b = s.draw(40, 64, rank=1), s.draw(40, 64, rank=1)
    assert a == b and a != s.draw(41, 64, rank=1) and a != s.draw(40, 64, rank=0)
    assert all(t.at[r, "partition"] == "fit" for _, r, _ in a)
    assert all(t.at[r, "has_image"] for task, r, _ in s.draw(100, 64) if task == "image_to_type")
    early = [task for task, _, _ in s.draw(0, 200)]
    late = [task for task, _, _ in s.draw(100, 200)]
    assert early.count("gene_to_type") == 200 and late.count("image_to_type") == 200  # the schedule moves
    no_img = TaskSampler(t.assign(has_image=False), sched, {"gene_to_type": 1, "image_to_type": 1}, seed=0, steps=10)
    assert no_img.tasks == ["gene_to_type"]


# ------------------------------------------------------------------------------ sentences
def test_cell_sentences_order_ties_and_top_k():
    genes = ["ZZZ", "AAA", "MMM", "BBB", "CCC"]
    X = sp.csr_matrix(np.array([[1.0, 1.0, 5.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 2.0]]))
    s = cell_sentences(X, genes, 3)
    assert s[0] == ["MMM", "AAA", "CCC"]  # ties (1.0) by symbol, zeros never listed
    assert s[1] == ["CCC"]
    assert cell_sentences(X[:, [4, 3, 2, 1, 0]], genes[::-1], 3) == s  # column order does not matter
    text, n = sentence_strings(X, genes, 3)  # the fold job's form: one arrow string per row, no loop over cells
    assert text.to_pylist() == ["MMM AAA CCC", "CCC"] and n.tolist() == [3, 1]
    empty, n0 = sentence_strings(sp.csr_matrix((2, 5)), genes, 3)
    assert empty.to_pylist() == ["", ""] and n0.tolist() == [0, 0]


def test_vectorised_sentences_equal_a_per_cell_ranking():
    rng = np.random.default_rng(3)
    genes = [f"g{rng.integers(1e6)}_{i}" for i in range(60)]
    X = log_normalise(sp.csr_matrix(rng.poisson(0.4, (300, 60)).astype(float)), "counts")
    got = cell_sentences(X, genes, 7)
    for i in range(X.shape[0]):  # the definition, cell by cell: descending value, ties by symbol, top 7
        row = X.getrow(i).toarray().ravel()
        want = sorted((g for g in range(60) if row[g] > 0), key=lambda g: (-row[g], genes[g]))[:7]
        assert got[i] == [genes[g] for g in want]


def test_hvg_on_training_cells_only():
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(200)]
    means = np.exp(rng.uniform(np.log(0.5), np.log(20), 200))

    def cells(variable):
        X = rng.poisson(means, (300, 200)).astype(float)
        on = rng.random((300, 1)) < 0.5  # half the cells express the program, the others do not
        X[:, variable] = rng.poisson(np.where(on, 2 * means[variable], 0.05), (300, len(variable)))
        return X

    fit, other = cells(list(range(5))), cells(list(range(100, 105)))
    hvg_fit = select_hvg(sp.csr_matrix(fit), genes, 5, values="counts")
    assert set(hvg_fit) == set(genes[:5])  # training cells decide; the others' program is not chosen
    both = select_hvg(sp.csr_matrix(np.vstack([fit, other])), genes, 10, values="counts")
    assert set(both) == set(genes[:5] + genes[100:105])
    assert select_hvg(sp.csr_matrix(fit), genes, 200, values="counts") == genes
    lognorm = log_normalise(sp.csr_matrix(fit), "counts")
    assert len(set(select_hvg(lognorm, genes, 5, values="normalised")) & set(genes[:5])) >= 4  # seurat flavour, log data


# ------------------------------------------------------------------------------ folds
def test_folds_are_donor_grouped_and_stratified():
    rng = np.random.default_rng(1)
    n = 600
    cells = pd.DataFrame({"tile_id": [f"c{i}" for i in range(n)], "sample_id": rng.choice(["s1", "s2"], n),
                          "patient_id": rng.choice([f"D{k}" for k in range(8)], n), "index": np.arange(n),
                          "label": rng.choice(["a", "b", "c"], n), "has_image": rng.random(n) < 0.3})
    folds = make_folds(cells, 3, 0.25, seed=0)
    assert all(f.equals(g) for f, g in zip(folds, make_folds(cells, 3, 0.25, seed=0), strict=True))  # deterministic
    for f in folds:
        check_donor_fold(f)
        assert f.groupby("patient_id")["partition"].nunique().max() == 1
        # a pooled sample's donors may sit in different partitions (grouping is by donor, not sample)
        assert f.groupby("sample_id")["partition"].nunique().max() > 1
    tested = sum((f["partition"] == "test").to_numpy().astype(int) for f in folds)
    assert (tested == 1).all()
    bad = folds[0].copy()
    bad.loc[bad.index[0], "partition"] = "fit" if bad["partition"].iat[0] != "fit" else "test"
    with pytest.raises(AssertionError, match="two partitions"):
        check_donor_fold(bad)
    with pytest.raises(InputError, match="donor"):
        make_folds(cells[cells["patient_id"].isin(["D0", "D1"])], 3, 0.25, 0)  # 3 donors would do (issue 23)


# ------------------------------------------------------------------------------ ingest
def _write_h5ad(path, X, labels, donors=None, **layers):
    obs = pd.DataFrame({"cell_type": labels}, index=[f"c{i}" for i in range(len(labels))])
    if donors is not None:
        obs["donor"] = donors
    a = ad.AnnData(X=sp.csr_matrix(np.asarray(X, np.float32)), obs=obs,
                   var=pd.DataFrame(index=[f"G{i}" for i in range(np.asarray(X).shape[1])]))
    for k, v in layers.items():
        a.layers[k] = sp.csr_matrix(np.asarray(v, np.float32))
    a.write_h5ad(path)
    return path


@pytest.fixture()
def label_map(tmp_path):
    p = tmp_path / "labels.yaml"
    p.write_text("T cell: [T]\nB cell: [B]\n_drop: [junk]\n")
    return p


def test_h5ad_ingest_writes_the_unit_contract(tmp_path, label_map):
    X = np.array([[3, 0, 1], [0, 2, 2], [1, 1, 0], [5, 0, 0]])
    h = _write_h5ad(tmp_path / "a.h5ad", X, ["T", "b", "junk", "T"], donors=["d1", "d1", "d2", "d2"])
    out = tmp_path / "units.h5ad"
    summary = build_units(sample="S1", patient="P", out_units=out, cfg=cells_cfg(donor_key="donor"),
                          label_map=label_map, h5ad=h)
    u = ad.read_h5ad(out)
    assert summary["dropped_by_label_map"] == 1 and u.n_obs == 3
    assert u.obs["label"].tolist() == ["T cell", "B cell", "T cell"]
    assert u.obs["patient_id"].tolist() == ["d1", "d1", "d2"] and u.obs["cell_id"].tolist() == ["c0", "c1", "c3"]
    assert u.obs_names.tolist() == ["S1__000000", "S1__000001", "S1__000002"]
    np.testing.assert_array_equal(u.X.toarray(), X[[0, 1, 3]])
    assert u.obsm["spatial"].shape == (3, 2) and u.uns["morphomol"]["spatial"] == "none (zeros)"
    assert u.uns["morphomol"]["unit"] == "cell" and u.uns["morphomol"]["values"] == "counts"


@pytest.mark.parametrize("case", ["no_label_column", "unknown_label", "float_counts", "negative", "no_layer", "no_donor"])
def test_h5ad_bad_input_is_one_clear_error_and_nothing_written(tmp_path, label_map, case):
    X = np.array([[3, 0, 1], [0, 2, 2]], float)
    labels = ["T", "B"]
    cfg = cells_cfg()
    if case == "no_label_column":
        cfg = cells_cfg(label_key="celltype")
    elif case == "unknown_label":
        labels = ["T", "NK"]
    elif case == "float_counts":
        X = X + 0.37
    elif case == "negative":
        X = X - 1.5
        cfg = cells_cfg(values="normalised")
    elif case == "no_layer":
        cfg = cells_cfg(layer="counts")
    elif case == "no_donor":
        cfg = cells_cfg(donor_key="donor")
    h = _write_h5ad(tmp_path / "a.h5ad", X, labels)
    out = tmp_path / "units.h5ad"
    with pytest.raises(InputError) as e:
        build_units(sample="S1", patient="P", out_units=out, cfg=cfg, label_map=label_map, h5ad=h)
    msg = e.value.message
    expected = {"no_label_column": "obs/celltype", "unknown_label": "'NK' (1 cells)", "float_counts": "non-integer value",
                "negative": "negative values", "no_layer": "layers/counts", "no_donor": "obs/donor"}[case]
    assert expected in msg and "a.h5ad" in msg
    assert not out.exists() and not list(tmp_path.glob(".units.h5ad*"))


def test_h5ad_with_a_row_aligned_image_store(tmp_path, label_map):
    """AnnData rows may bring their patches (e.g. Visium spots with the spots study's images.zarr)."""
    import zarr

    h = _write_h5ad(tmp_path / "a.h5ad", np.array([[3, 0, 1], [0, 2, 2], [1, 1, 0]]), ["T", "B", "T"])
    store = tmp_path / "images.zarr"
    g = zarr.open_group(str(store), mode="w", zarr_format=3)
    g.create_array("images", shape=(3, 8, 8, 3), chunks=(3, 8, 8, 3), dtype="uint8")
    out = tmp_path / "units.h5ad"
    build_units(sample="V1", patient="P", out_units=out, cfg=cells_cfg(), label_map=label_map, h5ad=h, image_store=store)
    assert ad.read_h5ad(out).obs["has_image"].all()
    g = zarr.open_group(str(store), mode="w", zarr_format=3)
    g.create_array("images", shape=(2, 8, 8, 3), chunks=(2, 8, 8, 3), dtype="uint8")
    with pytest.raises(InputError, match="2 patches for 3 cells"):
        build_units(sample="V1", patient="P", out_units=tmp_path / "u2.h5ad", cfg=cells_cfg(), label_map=label_map,
                    h5ad=h, image_store=store)


def test_pbmc68k_reduced_real_fixture(tmp_path):
    """scanpy's bundled pbmc68k_reduced: X is scaled (negative values), .raw holds log-normalised values
    (not counts): it loads with cells.layer: raw + cells.values: normalised, and is refused as counts."""
    import scanpy as sc

    a = sc.datasets.pbmc68k_reduced()
    h = tmp_path / "pbmc.h5ad"
    a.write_h5ad(h)
    lm = tmp_path / "pbmc_labels.yaml"
    lm.write_text(PBMC_MAP)
    out = tmp_path / "units.h5ad"
    with pytest.raises(InputError, match="negative values"):  # the scaled X
        build_units(sample="pbmc", patient="P", out_units=out, cfg=cells_cfg(label_key="bulk_labels"), label_map=lm, h5ad=h)
    with pytest.raises(InputError, match="non-integer value"):  # .raw as if it were counts
        build_units(sample="pbmc", patient="P", out_units=out, cfg=cells_cfg(label_key="bulk_labels", layer="raw"),
                    label_map=lm, h5ad=h)
    assert not out.exists()
    cfg = cells_cfg(label_key="bulk_labels", layer="raw", values="normalised", n_hvg=200, n_genes=30)
    s = build_units(sample="pbmc", patient="P", out_units=out, cfg=cfg, label_map=lm, h5ad=h)
    assert s["cells"] == 700 and len(s["labels"]) == 10
    u = ad.read_h5ad(out)
    assert u.n_vars == 765 and u.uns["morphomol"]["values"] == "normalised"
    # pbmc68k_reduced has no donors: pseudo-donors from the cell barcodes, for the split only (a test device)
    u.obs["patient_id"] = [f"pseudo{hash(c) % 6}" for c in u.obs["cell_id"]]
    u.write_h5ad(out)
    write_folds(units=[out], out=tmp_path / "folds.parquet", splits=default_sections(splits={"n_folds": 3}).splits,
                seed=0)
    meta = write_fold(units=[out], folds=tmp_path / "folds.parquet", fold=0, out_table=tmp_path / "f.parquet",
                      out_meta=tmp_path / "f.json", cfg=cfg)
    table, _ = read_fold(tmp_path / "f.parquet", tmp_path / "f.json")
    assert len(meta["hvg"]) == 200 and table["n_sentence_genes"].max() == 30
    # ranks by log-normalised value = ranks by counts: the first gene of a sentence is the cell's top gene
    top = np.asarray(a.raw.X[0].todense()).ravel()
    first = table.set_index("tile_id").loc["pbmc__000000", "sentence"].split()[0]
    assert top[list(a.raw.var_names).index(first)] == max(top[list(a.raw.var_names).index(g)] for g in meta["hvg"])
    from morphomol.studies.cells.baselines import run_baselines

    m = run_baselines(fold_table=tmp_path / "f.parquet", fold_meta=tmp_path / "f.json", units={"pbmc": out},
                      image_stores={}, out_predictions=tmp_path / "b.parquet", out_metrics=tmp_path / "b.json",
                      cfg=cfg.baselines, max_cells=None, seed=0)
    acc = {r["mode"]: r["accuracy"] for r in m["results"] if r["partition"] == "test" and r["subset"] == "all"}
    assert acc["logreg"] > acc["majority"] + 0.2 and acc["logreg"] > acc["logreg_shuffled"] + 0.2


def test_xenium_cells_from_a_real_10x_matrix(tmp_path, label_map):
    bundle = tmp_path / "xenium"
    bundle.mkdir()
    shutil.copy(DATA / "cells_xenium_mini" / "cell_feature_matrix.h5", bundle)
    shutil.copy(DATA / "xenium_mini_sfe" / "cells.parquet", bundle)
    X, genes, barcodes = read_10x_h5(bundle / "cell_feature_matrix.h5")
    assert X.shape == (526, len(genes)) and not any(g.startswith(("NegControl", "Unassigned")) for g in genes)
    assert "CD3D" in genes
    cd3 = np.asarray(X[:, genes.index("CD3D")].todense()).ravel()
    # test-made cell groups (the subset ships none): CD3D-expressing cells "T", others "B", a few unlisted
    groups = pd.DataFrame({"cell_id": barcodes[:500], "group": np.where(cd3[:500] > 0, "T", "B"), "color": "#000"})
    groups.to_csv(tmp_path / "groups.csv", index=False)
    out = tmp_path / "units.h5ad"
    build_units(sample="X", patient="P1", out_units=out, cfg=cells_cfg(), label_map=label_map, xenium_dir=bundle,
                labels=tmp_path / "groups.csv")
    u = ad.read_h5ad(out)
    assert u.n_obs == 500 and list(u.var_names) == genes
    cells = pd.read_parquet(bundle / "cells.parquet").set_index("cell_id")
    np.testing.assert_allclose(u.obsm["spatial"][:, 0], cells.loc[u.obs["cell_id"], "x_centroid"].to_numpy())
    assert (u.obs["label"] == "T cell").sum() == int((cd3[:500] > 0).sum())
    groups.loc[3, "cell_id"] = "not-a-cell"
    groups.to_csv(tmp_path / "groups.csv", index=False)
    with pytest.raises(InputError, match="not in cell_feature_matrix.h5"):
        build_units(sample="X", patient="P1", out_units=tmp_path / "u2.h5ad", cfg=cells_cfg(), label_map=label_map,
                    xenium_dir=bundle, labels=tmp_path / "groups.csv")
    assert not (tmp_path / "u2.h5ad").exists()


def test_fewer_than_two_training_types_is_an_error(tmp_path, label_map):
    X = np.random.default_rng(0).poisson(2, (40, 6))
    donors = [f"d{i % 5}" for i in range(40)]
    h = _write_h5ad(tmp_path / "a.h5ad", X, ["T"] * 40, donors=donors)
    build_units(sample="S", patient="P", out_units=tmp_path / "u.h5ad", cfg=cells_cfg(donor_key="donor"),
                label_map=label_map, h5ad=h)
    write_folds(units=[tmp_path / "u.h5ad"], out=tmp_path / "folds.parquet",
                splits=default_sections(splits={"n_folds": 2}).splits, seed=0)
    with pytest.raises(InputError, match="at least two cell types"):
        write_fold(units=[tmp_path / "u.h5ad"], folds=tmp_path / "folds.parquet", fold=0, out_table=tmp_path / "f.parquet",
                   out_meta=tmp_path / "f.json", cfg=cells_cfg())
    assert not (tmp_path / "f.parquet").exists()


# ------------------------------------------------------------------------------ scale: HVGs, folds, baselines
def _nb_counts(rng, n, G):
    means = np.exp(rng.uniform(np.log(0.05), np.log(30), G))
    X = rng.negative_binomial(2, 2 / (2 + means), (n, G)).astype(np.float32)
    X[rng.random(X.shape) < 0.3] = 0
    X[:, :3] *= 300  # a few very large counts (float32 squares above 2**24)
    return sp.csr_matrix(X)


@pytest.mark.parametrize("values,flavor", [("counts", "seurat_v3"), ("counts", "seurat"), ("counts", "cell_ranger"),
                                           ("normalised", "seurat"), ("normalised", "cell_ranger")])
def test_hvgs_from_row_block_sums_equal_scanpy(values, flavor):
    """Per-gene sums over row blocks (memory O(genes)) pick exactly scanpy's highly variable genes."""
    import warnings

    import scanpy as sc

    rng = np.random.default_rng(0)
    genes = [f"G{i:04d}" for i in range(600)]
    X = _nb_counts(rng, 1200, 600)
    if values == "normalised":
        X = log_normalise(X, "counts")
    a = ad.AnnData(X=sp.csr_matrix(X, dtype=np.float32), var=pd.DataFrame(index=pd.Index(genes, dtype=object)))
    if values == "counts" and flavor != "seurat_v3":
        a.X = log_normalise(a.X, "counts").astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(a, n_top_genes=120, flavor=flavor)
    want = [g for g, h in zip(genes, a.var["highly_variable"], strict=True) if h]
    got = select_hvg_blocks(lambda: (X[i:i + 97] for i in range(0, X.shape[0], 97)), genes, 120, values=values,
                            flavor=flavor)
    assert got == want and len(got) >= 120


LABELS = REPO / "config" / "cohorts" / "demo_cells" / "labels.yaml"


@pytest.fixture(scope="module")
def sim_cohort(tmp_path_factory):
    """The demo's scRNA-seq-like samples (two pools of three donors, 110 cells each) as unit tables; SC2 with a
    row-aligned image store whose patch colour depends on the cell type."""
    import zarr

    from morphomol.synthetic.cells import simulate_cells_sample

    d = tmp_path_factory.mktemp("cells_sim")
    units = {}
    for s, donors in (("SC1", ["D1", "D2", "D3"]), ("SC2", ["D4", "D5", "D6"])):
        h = d / s / "cells.h5ad"
        h.parent.mkdir(parents=True)
        simulate_cells_sample({"h5ad": h}, sample=s, patient=s, kind="h5ad",
                              params={"seed": 11, "cells_per_donor": 110, "pools": {s: donors}})
        store = None
        if s == "SC2":
            lab = ad.read_h5ad(h).obs["cell_type"].astype(str).to_numpy()
            rng = np.random.default_rng(5)
            colour = {c: rng.integers(40, 220, 3) for c in sorted(set(lab))}
            imgs = np.stack([np.clip(colour[c] + rng.normal(0, 25, (16, 16, 3)), 0, 255) for c in lab]).astype(np.uint8)
            store = d / s / "images.zarr"
            g = zarr.open_group(str(store), mode="w", zarr_format=3)
            g.create_array("images", shape=imgs.shape, chunks=(64, 16, 16, 3), dtype="uint8")[:] = imgs
        units[s] = d / s / "units.h5ad"
        build_units(sample=s, patient=s, out_units=units[s], cfg=cells_cfg(donor_key="donor"), label_map=LABELS,
                    h5ad=h, image_store=store)
    return {"dir": d, "units": units, "stores": {"SC2": d / "SC2" / "images.zarr"}}


def _dense_hvg(units, table, hvg):
    """Reference: every unit table read whole, log1p-normalised, HVG columns, rows in the table's order."""
    out = np.zeros((len(table), len(hvg)), np.float32)
    for s, path in units.items():
        a = ad.read_h5ad(path)
        X = log_normalise(a.X, "counts")[:, [list(a.var_names).index(g) for g in hvg]].toarray()
        pos = np.flatnonzero(table["sample_id"].to_numpy() == s)
        out[pos] = X[table["index"].to_numpy()[pos]]
    return out


def test_fold_jobs_stream_row_blocks_and_equal_the_in_memory_computation(sim_cohort, tmp_path):
    import scanpy as sc

    units = list(sim_cohort["units"].values())
    splits = default_sections(splits={"n_folds": 3, "val_fraction": 0.25}).splits
    folds = write_folds(units=units, out=tmp_path / "folds.parquet", splits=splits, seed=0)
    assert folds.equals(read_donor_folds(tmp_path / "folds.parquet"))
    assert (folds[folds["partition"] == "test"].groupby("patient_id").size() == 1).all()  # each donor tested once
    assert len(folds) == 3 * 6  # folds x donors: the assignment never holds a row per cell
    cfg = cells_cfg(n_hvg=40, n_genes=12)
    kw = dict(units=units, folds=tmp_path / "folds.parquet", fold=1, cfg=cfg)
    meta = write_fold(**kw, out_table=tmp_path / "a.parquet", out_meta=tmp_path / "a.json")
    meta_small = write_fold(**kw, out_table=tmp_path / "b.parquet", out_meta=tmp_path / "b.json", nnz_per_block=300)
    table, _ = read_fold(tmp_path / "a.parquet", tmp_path / "a.json")
    assert meta_small == meta and pd.read_parquet(tmp_path / "b.parquet").equals(pd.read_parquet(tmp_path / "a.parquet"))
    # the same cells, split and text as computing everything in memory
    full = [ad.read_h5ad(u) for u in units]
    cells = pd.concat([pd.DataFrame({"tile_id": a.obs_names, "sample_id": a.obs["sample_id"].astype(str),
                                     "patient_id": a.obs["patient_id"].astype(str), "index": a.obs["index"],
                                     "label": a.obs["label"].astype(str), "has_image": a.obs["has_image"]})
                       for a in full], ignore_index=True)
    per_cell = make_folds(cells, 3, 0.25, seed=0)[1]
    assert per_cell["partition"].tolist() == table["partition"].tolist()
    assert table["tile_id"].tolist() == cells["tile_id"].tolist()
    counts = sp.vstack([a.X for a in full]).tocsr()
    fit = ad.AnnData(X=sp.csr_matrix(counts[np.flatnonzero(table["partition"] == "fit")], dtype=np.float32),
                     var=pd.DataFrame(index=full[0].var_names))
    sc.pp.highly_variable_genes(fit, n_top_genes=40, flavor="seurat_v3")
    assert meta["hvg"] == [g for g, h in zip(full[0].var_names, fit.var["highly_variable"], strict=True) if h]
    cols = [list(full[0].var_names).index(g) for g in meta["hvg"]]
    want = cell_sentences(log_normalise(counts, "counts")[:, cols], meta["hvg"], 12)
    assert table["sentence"].tolist() == [" ".join(s) for s in want]
    assert meta["counts"] == table["partition"].value_counts().reindex(["fit", "val", "test"]).to_dict()
    lazy = FoldSentences(tmp_path / "a.parquet", cache_groups=1)
    assert len(lazy) == len(table) and [lazy[i] for i in (5, 0, len(table) - 1)] == table["sentence"].iloc[[5, 0, -1]].tolist()


def test_standardised_logreg_equals_scikit_learn_on_standardised_data():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from morphomol.studies.cells.logreg import StandardisedLogisticRegression

    rng = np.random.default_rng(2)
    X = rng.poisson(rng.uniform(0.2, 6, 30), (400, 30)).astype(float) * rng.uniform(0.1, 10, 30)
    X[:, 7] = 3.0  # a constant column
    for k in (2, 4):
        y = np.asarray([f"c{v}" for v in (X[:, :k] @ rng.normal(size=k) + rng.normal(0, 2, 400) > 0).astype(int)]) \
            if k == 2 else np.asarray([f"c{v}" for v in np.argmax(X[:, :k] + rng.normal(0, 3, (400, k)), 1)])
        ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=500)).fit(X, y)
        ours = StandardisedLogisticRegression(C=0.5, max_iter=500).fit(sp.csr_matrix(X), y)
        assert (ours.predict(sp.csr_matrix(X)) == ref.predict(X)).all()
        np.testing.assert_allclose(ours.decision_function(X), ref.decision_function(X), atol=2e-3)


def test_sparse_baselines_equal_the_dense_ones(sim_cohort, tmp_path):
    """Sparse logistic regression (standardised implicitly), kNN on a reference that holds every fit cell
    here, image / both: the same predictions as dense StandardScaler + LogisticRegression and PCA + kNN on
    every fit cell (today's baselines); with a smaller max_reference the kNN reference is bounded and stated."""
    from PIL import Image
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from morphomol.studies.cells.baselines import run_baselines

    units = sim_cohort["units"]
    write_folds(units=list(units.values()), out=tmp_path / "folds.parquet",
                splits=default_sections(splits={"n_folds": 3}).splits, seed=0)
    # one-value grids: the inner CV can only choose these (the dense references below use them)
    cfg = cells_cfg(baselines={"knn_k": 15, "knn_pcs": 20, "knn_k_grid": [15], "lr_c_grid": [1.0],
                               "lr_standardise": [True]})
    write_fold(units=list(units.values()), folds=tmp_path / "folds.parquet", fold=0, out_table=tmp_path / "f.parquet",
               out_meta=tmp_path / "f.json", cfg=cfg)
    kw = dict(fold_table=tmp_path / "f.parquet", fold_meta=tmp_path / "f.json", units=units,
              image_stores=sim_cohort["stores"], max_cells=None, seed=0)
    m = run_baselines(**kw, out_predictions=tmp_path / "b.parquet", out_metrics=tmp_path / "b.json", cfg=cfg.baselines)
    preds = pd.read_parquet(tmp_path / "b.parquet")
    table, meta = read_fold(tmp_path / "f.parquet", tmp_path / "f.json")
    X = _dense_hvg(units, table, meta["hvg"])
    y = table["label"].to_numpy(object)
    fit = (table["partition"] == "fit").to_numpy()
    img = table["has_image"].to_numpy(bool)
    import zarr

    raw = np.asarray(zarr.open_group(str(sim_cohort["stores"]["SC2"]), mode="r")["images"][:])
    T = np.zeros((len(table), 16 * 16 * 3), np.float32)
    for i in np.flatnonzero(img):
        T[i] = np.asarray(Image.fromarray(raw[table["index"].iat[i]]).resize((16, 16), Image.Resampling.BILINEAR),
                          np.float32).ravel() / 255.0

    def lr():
        return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=0))

    pcs = min(20, int(fit.sum()) - 1, X.shape[1])
    dense = {"logreg": (lr().fit(X[fit], y[fit]), X),
             "logreg_shuffled": (lr().fit(X[fit], np.random.default_rng([0, 5]).permutation(y[fit])), X),
             "knn": (make_pipeline(PCA(n_components=pcs, random_state=0),
                                   KNeighborsClassifier(n_neighbors=15, metric="cosine")).fit(X[fit], y[fit]), X),
             "logreg_image": (lr().fit(T[fit & img], y[fit & img]), T),
             "logreg_both": (lr().fit(np.c_[X, T][fit & img], y[fit & img]), np.c_[X, T])}
    pos = pd.Series(np.arange(len(table)), index=table["tile_id"])
    assert {"logreg_image", "logreg_both"} <= set(preds["mode"])
    for mode, (model, feats) in dense.items():
        p = preds[preds["mode"] == mode]
        assert len(p) > 0
        want = model.predict(feats[pos[p["tile_id"]].to_numpy()])
        assert (p["pred"].to_numpy() == want).all(), mode
    assert m["knn_reference"] == m["n_fit"] == int(fit.sum()) and m["image_reference"] == int((fit & img).sum())
    small = run_baselines(**kw, out_predictions=tmp_path / "s.parquet", out_metrics=tmp_path / "s.json",
                          cfg=dataclasses.replace(cfg.baselines, max_reference=60))
    assert small["knn_reference"] == 60 and small["image_reference"] == 60
    acc = {r["mode"]: r["accuracy"] for r in small["results"] if r["partition"] == "test" and r["subset"] == "all"}
    assert acc["knn"] > acc["majority"] + 0.1  # a 60-cell reference still learns the types
    from morphomol.studies.cells.tables import reference_notes

    assert reference_notes([m]) == [] and "at most 60" in reference_notes([small])[0]


# ------------------------------------------------------------------------------ model directory
def test_base_model_directory_checks(tmp_path):
    d = tmp_path / "model"
    with pytest.raises(InputError, match="not found"):
        check_model_dir(d)
    d.mkdir()
    with pytest.raises(InputError, match="no config.json"):
        check_model_dir(d)
    (d / "config.json").write_text('{"model_type": "gemma3"}')
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="pickled weights are never loaded"):
        check_model_dir(d)
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00001-of-00002.safetensors"}}')
    with pytest.raises(InputError, match="lacks weight shard"):
        check_model_dir(d)
    (d / "model-00001-of-00002.safetensors").write_bytes(b"x")
    with pytest.raises(InputError, match="no processor"):
        check_model_dir(d)
    (d / "processor_config.json").write_text("{}")
    with pytest.raises(InputError, match="no tokenizer"):
        check_model_dir(d)
    (d / "tokenizer.json").write_text("{}")
    assert check_model_dir(d) == d


# ------------------------------------------------------------------------------ cohort pre-flight
def _cohort(tmp_path, rows, **cells):
    import yaml

    from morphomol.config import load_config

    (tmp_path / "labels.yaml").write_text("T cell: [T]\nB cell: [B]\n")
    sheet = tmp_path / "samples.tsv"
    cols = ["sample_id", "patient_id", "h5ad", "xenium_dir", "labels", "he_path"]
    sheet.write_text("\t".join(cols) + "\n" + "".join("\t".join(r.get(c, "") for c in cols) + "\n" for r in rows))
    for r in rows:
        for c in ("h5ad", "labels", "he_path"):
            if r.get(c):
                (tmp_path / r[c]).write_text("x")
        if r.get("xenium_dir"):
            (tmp_path / r["xenium_dir"]).mkdir(exist_ok=True)
    base = {"label_map": "labels.yaml", "templates": str(TEMPLATES), "model": {"tiny": {}}, **cells}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"kind": "cells", "samples": "samples.tsv", "cells": base,
                                                     "splits": {"n_folds": 2}}))
    cfg = {"cohorts": {"c": "c.yaml"}}
    return lambda: load_config(cfg, config_file=tmp_path / "config.yaml", workdir=tmp_path)


def test_cohort_preflight_checks(tmp_path):
    h5 = [{"sample_id": f"S{i}", "patient_id": f"P{i}", "h5ad": f"s{i}.h5ad"} for i in range(3)]
    text_only = {"tasks": {"gene_to_type": [[0, 1.0]], "type_to_genes": [[0, 0.5]]}}
    pc = _cohort(tmp_path, h5, **text_only)()
    assert pc.cohorts["c"].studies == ("cells",) and pc.cohorts["c"].kind.name == "cells"
    with pytest.raises(InputError, match="only image task"):  # nothing left to train without patches
        _cohort(tmp_path, h5, tasks={"image_to_type": [[0, 1.0]]})()
    with pytest.raises(InputError, match="exactly one of h5ad / xenium_dir"):
        _cohort(tmp_path, [{**h5[0], "xenium_dir": "x"}, *h5[1:]], **text_only)()
    with pytest.raises(InputError, match="cell-groups CSV"):
        _cohort(tmp_path, [{"sample_id": "X", "patient_id": "P9", "xenium_dir": "x", "he_path": "he.tif"}, *h5])()
    with pytest.raises(InputError, match="label map"):
        _cohort(tmp_path, h5, **text_only, label_map=None)()
    with pytest.raises(InputError, match="model.path / model.tiny"):
        _cohort(tmp_path, h5, **text_only, model={"path": "m", "tiny": {}})()
    with pytest.raises(InputError, match="base model directory"):
        _cohort(tmp_path, h5, **text_only, model={"tiny": None, "path": "nowhere"})()
    _cohort(tmp_path, h5[:2], **text_only)()  # 2 donors allow 2 folds (issue 23: the shared fold rule)
    with pytest.raises(InputError, match="2 folds need >= 2 donors; cohort 'c' has 1 donor"):
        _cohort(tmp_path, h5[:1], **text_only)()


def test_demo_cohort_config_is_valid():
    from morphomol.config import load_config

    pc = load_config(REPO / "config" / "config.yaml", workdir=REPO)
    c = pc.cohorts["demo_cells"]
    assert c.kind.name == "cells" and c.cfg.cells.model.tiny is not None and c.cfg.cells.donor_key == "donor"
    assert dataclasses.asdict(c.cfg.cells.lora)["r"] == 16 and c.cfg.cells.quantization == "auto"
