"""Slides study inputs: GMT reading and coverage, ssGSEA against known scores, null sets, the bulk RNA
reader (formats, orientation, value types, matching) and its bad-input errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from morphomol.errors import InputError
from morphomol.studies.slides.config import GeneSetsConfig, RnaConfig
from morphomol.studies.slides.genesets import match_sets, null_sets, read_gmt, read_gmts, score_gene_sets, ssgsea
from morphomol.studies.slides.rna import prepare_rna, read_expression

HALLMARK = Path(__file__).parent / "data" / "slides_gene_sets" / "h.all.v7.0.symbols.gmt"


# ------------------------------------------------------------------------------ GMT
def test_read_real_hallmark_gmt():
    sets = read_gmt(HALLMARK)
    assert len(sets) == 50
    assert "HALLMARK_G2M_CHECKPOINT" in sets and "CDK1" in sets["HALLMARK_G2M_CHECKPOINT"]
    assert all(32 <= len(g) <= 200 for g in sets.values())


@pytest.mark.parametrize("text, what", [("SET_A\tdesc\n", "tab-separated"), ("A\td\tG1\nA\td\tG2\n", "twice")])
def test_bad_gmt_is_one_error_naming_the_line(tmp_path, text, what):
    p = tmp_path / "bad.gmt"
    p.write_text(text)
    with pytest.raises(InputError, match=what) as exc:
        read_gmt(p)
    assert "bad.gmt" in str(exc.value) and "line" in str(exc.value)


def test_set_name_in_two_files_is_an_error(tmp_path):
    (tmp_path / "a.gmt").write_text("S\td\tG1\tG2\n")
    (tmp_path / "b.gmt").write_text("S\td\tG3\n")
    with pytest.raises(InputError, match="in .*a.gmt and in .*b.gmt"):
        read_gmts([tmp_path / "a.gmt", tmp_path / "b.gmt"])


def test_coverage_reports_missing_genes_and_rejects_small_sets():
    sets = {"A": ["G1", "G2", "G3", "X1"], "B": ["G4", "X2", "X3"]}
    genes = ["G1", "G2", "G3", "G4"]
    matched, cov = match_sets(sets, genes, min_genes=1, max_genes=10)
    assert matched == {"A": ["G1", "G2", "G3"], "B": ["G4"]}
    assert cov.set_index("gene_set").loc["B", "missing"] == "X2;X3"
    with pytest.raises(InputError, match=r"B \(1 of 3\)") as exc:
        match_sets(sets, genes, min_genes=2, max_genes=10, file="x.gmt")
    assert "slides.gene_sets.min_genes" in str(exc.value)


def test_gmt_sharing_no_gene_with_the_data_is_an_error():
    with pytest.raises(InputError, match="none of the 50 gene sets shares a gene"):
        match_sets(read_gmt(HALLMARK), ["ENSG000001", "ENSG000002"], min_genes=5, max_genes=500)


def test_null_sets_are_size_matched_seeded_and_drawn_from_the_data():
    genes = [f"G{i}" for i in range(500)]
    a = null_sets([32, 100, 200], genes, 5, seed=1)
    assert a == null_sets([32, 100, 200], genes, 5, seed=1) and a != null_sets([32, 100, 200], genes, 5, seed=2)
    assert sorted(len(v) for v in a.values()) == [32, 66, 100, 150, 200]
    assert all(set(v) <= set(genes) and len(set(v)) == len(v) for v in a.values())


# ------------------------------------------------------------------------------ ssGSEA
def test_ssgsea_matches_a_hand_computed_score():
    # one sample, genes A > B > C > D > E, set {A, C}; ranks 5..1, weight 0.25:
    # P_hit after A, B, C, D, E = a, a, 1, 1, 1 with a = 5^.25 / (5^.25 + 3^.25)
    # P_miss (B, D, E are misses)  = 0, 1/3, 1/3, 2/3, 1
    expr = pd.DataFrame({"s1": [5.0, 4.0, 3.0, 2.0, 1.0], "s2": [1.0, 2.0, 3.0, 4.0, 5.0]}, index=list("ABCDE"))
    a = 5 ** 0.25 / (5 ** 0.25 + 3 ** 0.25)
    expected = a + (a - 1 / 3) + (1 - 1 / 3) + (1 - 2 / 3) + 0.0
    es = ssgsea(expr, {"S": ["A", "C"]})
    assert es.loc["s1", "S"] == pytest.approx(expected, rel=1e-6)
    # reversed profile: E > D > C > B > A; set genes C (rank 3) and A (rank 1): a2 = 3^.25 / (3^.25 + 1)
    # P_hit after E, D, C, B, A = 0, 0, a2, a2, 1; P_miss (E, D, B) = 1/3, 2/3, 2/3, 1, 1
    a2 = 3 ** 0.25 / (3 ** 0.25 + 1.0)
    expected2 = (0 - 1 / 3) + (0 - 2 / 3) + (a2 - 2 / 3) + (a2 - 1) + (1 - 1)
    assert es.loc["s2", "S"] == pytest.approx(expected2, rel=1e-6)


def _reference_ssgsea(X: np.ndarray, idx: np.ndarray, alpha: float = 0.25) -> np.ndarray:
    """Barbie et al. / GSVA ``method="ssgsea", ssgsea.norm=FALSE``, written out independently of gseapy."""
    from scipy.stats import rankdata

    out = []
    for j in range(X.shape[1]):
        r = rankdata(X[:, j])
        order = np.argsort(-r, kind="stable")
        hit = np.isin(order, idx)
        w = (r[order] * hit) ** alpha
        out.append(float((np.cumsum(w) / w.sum() - np.cumsum(~hit) / (~hit).sum()).sum()))
    return np.array(out)


def test_ssgsea_on_a_small_real_matrix_matches_the_published_definition():
    import scanpy as sc

    ad = sc.datasets.pbmc68k_reduced()
    raw = pd.DataFrame(ad.raw.X.toarray() if hasattr(ad.raw.X, "toarray") else ad.raw.X, columns=ad.raw.var_names)
    bulk = raw.groupby(ad.obs["bulk_labels"].to_numpy()).mean().T  # genes x 10 cell-type pseudo-bulks
    # the order of tied values is implementation-defined (R's order() vs gseapy's sort): keep untied genes
    bulk = bulk[(bulk > 0).all(axis=1)]
    bulk = bulk[~bulk.apply(lambda c: c.duplicated(keep=False)).any(axis=1)]
    have = set(bulk.index)
    sets = {k: [g for g in v if g in have] for k, v in read_gmt(HALLMARK).items()}
    sets = {k: v for k, v in sets.items() if len(v) >= 10}
    assert len(sets) >= 5
    es = ssgsea(bulk, sets)
    pos = {g: i for i, g in enumerate(bulk.index)}
    for name, genes in sets.items():
        ref = _reference_ssgsea(bulk.to_numpy(), np.array([pos[g] for g in genes]))
        np.testing.assert_allclose(es[name].to_numpy(), ref, rtol=1e-6, atol=1e-9)
    # and the scores make biological sense: MYC targets highest in the proliferating CD34+ progenitors,
    # allograft rejection lowest there, interferon-gamma response higher in monocytes than in progenitors
    assert es["HALLMARK_MYC_TARGETS_V1"].idxmax() == "CD34+"
    assert es["HALLMARK_ALLOGRAFT_REJECTION"].idxmin() == "CD34+"
    assert es.at["CD14+ Monocyte", "HALLMARK_INTERFERON_GAMMA_RESPONSE"] > es.at["CD34+", "HALLMARK_INTERFERON_GAMMA_RESPONSE"]


# ------------------------------------------------------------------------------ RNA matrix
SHEET = [{"sample_id": f"S{i}", "patient_id": f"P{i // 2}", "cohort": "C1" if i < 4 else "C2"} for i in range(6)]


def _counts(n_genes: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.poisson(50, size=(n_genes, 6)), index=[f"G{i}" for i in range(n_genes)],
                        columns=[s["sample_id"] for s in SHEET])


def _prepare(tmp_path: Path, matrix: Path, sheet=SHEET, **cfg) -> pd.DataFrame:
    return prepare_rna(sheet=sheet, out_expression=tmp_path / "out" / "expression.h5ad",
                       out_preprocessing=tmp_path / "out" / "preprocessing.json", out_genes=tmp_path / "out" / "genes.txt",
                       cfg=RnaConfig(**cfg), matrix=matrix)


@pytest.mark.parametrize("fmt", ["tsv", "csv_transposed", "parquet", "h5ad"])
def test_rna_formats_and_orientations_give_log2_cpm(tmp_path, fmt):
    c = _counts()
    if fmt == "tsv":
        p = tmp_path / "m.tsv"
        c.to_csv(p, sep="\t")
    elif fmt == "csv_transposed":
        p = tmp_path / "m.csv"
        c.T.to_csv(p)
    elif fmt == "parquet":
        p = tmp_path / "m.parquet"
        c.to_parquet(p)
    else:
        import anndata as ad

        p = tmp_path / "m.h5ad"
        ad.AnnData(c.T.astype(np.float32)).write_h5ad(p)
    L = _prepare(tmp_path, p)
    cpm = c.T / c.sum(axis=0).to_numpy()[:, None] * 1e6
    np.testing.assert_allclose(L.to_numpy(), np.log2(cpm.to_numpy() + 1), rtol=1e-6)
    assert list(read_expression(tmp_path / "out" / "expression.h5ad").columns) == list(c.index)
    assert (tmp_path / "out" / "genes.txt").read_text().split() == list(c.index)
    assert '"transform": "log2(CPM + 1)"' in (tmp_path / "out" / "preprocessing.json").read_text()


def test_rna_id_maps_sheet_samples_to_matrix_columns(tmp_path):
    c = _counts()
    c.columns = [f"TCGA-{s}" for s in c.columns]
    c.to_csv(tmp_path / "m.tsv", sep="\t")
    sheet = [{**s, "rna_id": f"TCGA-{s['sample_id']}"} for s in SHEET]
    L = _prepare(tmp_path, tmp_path / "m.tsv", sheet=sheet)
    assert list(L.index) == [s["sample_id"] for s in SHEET]


def _bad(tmp_path: Path, c: pd.DataFrame, match: str, **cfg) -> None:
    c.to_csv(tmp_path / "m.tsv", sep="\t")
    with pytest.raises(InputError, match=match) as exc:
        _prepare(tmp_path, tmp_path / "m.tsv", **cfg)
    assert "m.tsv" in str(exc.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written


def test_rna_matrix_without_some_slides_is_an_error(tmp_path):
    _bad(tmp_path, _counts().drop(columns=["S2", "S5"]), r"2 slide\(s\) of the sample sheet have no RNA profile: S2, S5")


def test_duplicate_gene_symbols_are_an_error(tmp_path):
    c = _counts()
    c.index = ["G0", "G0"] + list(c.index[2:])
    _bad(tmp_path, c, "duplicate gene symbol.*G0")


def test_negative_counts_are_an_error(tmp_path):
    c = _counts()
    c.iloc[3, 1] = -2
    _bad(tmp_path, c, "negative value -2 at gene G3, sample S1 but value_type is 'counts'")


def test_value_type_mismatching_the_numbers_is_an_error(tmp_path):
    logged = np.log2(_counts() + 1.0) + 0.01
    _bad(tmp_path, logged, "non-integer value .* but value_type is 'counts'", value_type="counts")
    _bad(tmp_path, logged, "look log-transformed .* value_type is 'tpm'", value_type="tpm")
    _bad(tmp_path, _counts() * 1000, "not on a log2\\(x \\+ 1\\) scale", value_type="log")
    _bad(tmp_path, logged - 10, "negative value .* value_type 'log'", value_type="log")


def test_score_gene_sets_writes_scores_sets_and_coverage(tmp_path):
    sets = read_gmt(HALLMARK)
    genes = sorted({g for v in sets.values() for g in v})[:1500]
    rng = np.random.default_rng(0)
    c = pd.DataFrame(rng.poisson(30, size=(len(genes), 6)), index=genes, columns=[s["sample_id"] for s in SHEET])
    c.to_csv(tmp_path / "m.tsv", sep="\t")
    _prepare(tmp_path, tmp_path / "m.tsv")
    cfg = GeneSetsConfig(gmt=(str(HALLMARK),), min_genes=2, n_null=4, grounded=("HALLMARK_G2M_CHECKPOINT",))
    scores = score_gene_sets(expression=tmp_path / "out" / "expression.h5ad", gmt=[HALLMARK],
                             out_scores=tmp_path / "g" / "scores.parquet", out_sets=tmp_path / "g" / "sets.json",
                             out_coverage=tmp_path / "g" / "coverage.tsv", cfg=cfg, seed=0)
    assert scores.shape == (6, 54) and list(scores.index) == [s["sample_id"] for s in SHEET]
    cov = pd.read_csv(tmp_path / "g" / "coverage.tsv", sep="\t")
    assert (cov["n_found"] + cov["n_missing"] == cov["n_genes"]).all() and (cov["n_missing"] > 0).any()
    assert pd.read_parquet(tmp_path / "g" / "scores.parquet").shape == (6, 54)


def test_pseudobulk_of_a_spatial_cohort_sums_unit_counts(tmp_path):
    import scipy.sparse as sp

    from morphomol.data.units import write_units

    rng = np.random.default_rng(0)
    units, mats = [], {}
    for s in ("X1", "X2"):
        m = rng.poisson(3, size=(20, 5))
        mats[s] = m
        obs = pd.DataFrame(index=[f"{s}__{i:06d}" for i in range(20)])
        write_units(tmp_path / f"{s}.h5ad", obs, sp.csr_matrix(m), [f"G{i}" for i in range(5)],
                    spatial_um=np.zeros((20, 2)), unit="spot", sample=s, patient="P")
        units.append(tmp_path / f"{s}.h5ad")
    sheet = [{"sample_id": "SL1", "patient_id": "P", "cohort": "C", "rna_id": "X2"},
             {"sample_id": "SL2", "patient_id": "P", "cohort": "C", "rna_id": "X1"}]
    L = prepare_rna(sheet=sheet, out_expression=tmp_path / "o" / "e.h5ad", out_preprocessing=tmp_path / "o" / "p.json",
                    out_genes=tmp_path / "o" / "g.txt", cfg=RnaConfig(), units=units, unit_samples=["X1", "X2"])
    counts = mats["X2"].sum(axis=0)
    np.testing.assert_allclose(L.loc["SL1"].to_numpy(), np.log2(counts / counts.sum() * 1e6 + 1))
    assert '"pseudobulk_from"' in (tmp_path / "o" / "p.json").read_text()
