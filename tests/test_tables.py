"""Aggregation, statistics and rendering of the benchmark tables on hand-made metrics files."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from morphomol.config.sections import TablesConfig
from morphomol.errors import InputError
from morphomol.eval import stats as ES
from morphomol.report import metadata as M
from morphomol.report import render as R
from morphomol.report import runs as RR
from morphomol.studies.fusion import tables as T
from morphomol.studies.fusion.settings import ModelSetting

GENES = ["G1", "G2"]

SETTING_FIELDS = {
    "late_concat_token": {"kind": "regression", "fusion_stage": "late", "fusion_strategy": "concat",
                          "morph_encoder": "vit_s", "freeze_morph": True, "expr_encoder": "mlp",
                          "freeze_expr": False, "expr_aggregation": "token", "paper_row": 26},
    "morph_vit_s": {"kind": "regression", "fusion_stage": "none", "fusion_strategy": None, "morph_encoder": "vit_s",
                    "freeze_morph": False, "expr_encoder": None, "freeze_expr": False, "expr_aggregation": None,
                    "paper_row": 30},
    "morph_conch": {"kind": "regression", "fusion_stage": "none", "fusion_strategy": None, "morph_encoder": "conch",
                    "freeze_morph": True, "expr_encoder": None, "freeze_expr": False, "expr_aggregation": None,
                    "paper_row": 27},
    "expr_mlp_token": {"kind": "regression", "fusion_stage": "none", "morph_encoder": None, "expr_encoder": "mlp",
                       "freeze_expr": False, "expr_aggregation": "token", "paper_row": 33},
    "min_mae": {"kind": "min_mae", "paper_row": "min-mae"},
    "clip_token": {"kind": "clip", "morph_encoder": "vit_s", "expr_encoder": "mlp", "expr_aggregation": "token"},
    "clip_tile": {"kind": "clip", "morph_encoder": "vit_s", "expr_encoder": "mlp", "expr_aggregation": "tile"},
}
#: validated settings (schema + combinations + encoder registry), as the workflow loads them
SETTINGS = {n: ModelSetting.from_dict(n, d) for n, d in SETTING_FIELDS.items()}
TABLES = TablesConfig(baseline="best_morph_only", plot_gene=None, alpha=0.05, ridge=True, spatial_samples=None,
                      thumbnail_max_size=1024)

# per-fold mean metrics (spearman, pearson, mse) chosen by hand
FOLDS = {
    "late_concat_token": [(0.80, 0.81, 0.70), (0.82, 0.83, 0.66), (0.84, 0.84, 0.65), (0.82, 0.82, 0.69)],
    "morph_vit_s": [(0.60, 0.62, 1.30), (0.65, 0.66, 1.35), (0.66, 0.66, 1.28), (0.61, 0.63, 1.37)],
    "expr_mlp_token": [(0.70, 0.71, 1.00), (0.74, 0.73, 1.10), (0.73, 0.72, 1.05), (0.71, 0.70, 1.02)],
    "min_mae": [(0.72, 0.73, 1.10), (0.73, 0.73, 1.20), (0.72, 0.74, 1.15), (0.74, 0.72, 1.12)],
}
CLIP = {"clip_token": [(0.06, 0.20), (0.065, 0.21), (0.058, 0.195), (0.061, 0.2)],
        "clip_tile": [(0.04, 0.15), (0.045, 0.16), (0.038, 0.14), (0.042, 0.155)]}


def write_run(root: Path, setting: str, fold: int, payload: dict) -> Path:
    d = root / "runs" / setting / f"fold{fold}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text(json.dumps(payload))
    return d / "metrics.json"


def regression_payload(setting: str, fold: int, sp: float, pe: float, mse: float, gene_offset: float = 0.0) -> dict:
    # per-gene values: G1 = mean + 0.05, G2 = mean - 0.05 (+ offset so genes differ between settings)
    per_gene = {
        "G1": {"spearman": sp + 0.05 + gene_offset, "pearson": pe + 0.05, "mse": mse, "mae": 0.5},
        "G2": {"spearman": sp - 0.05 - gene_offset, "pearson": pe - 0.05, "mse": mse, "mae": 0.5},
    }
    return {"setting": setting, "fold": fold, "kind": "regression", "status": "ok", "n_fit": 10, "n_val": 5,
            "n_test": 5, "genes": GENES, "mean": {"spearman": sp, "pearson": pe, "mse": mse, "mae": 0.5},
            "per_gene": per_gene, "best_epoch": 2, "epochs_run": 4, "train_seconds": 1.5, "tiles_per_second": 10.0}


@pytest.fixture()
def cohort(tmp_path: Path) -> Path:
    for s, vals in FOLDS.items():
        for k, (sp, pe, mse) in enumerate(vals):
            write_run(tmp_path, s, k, regression_payload(s, k, sp, pe, mse, 0.02 if s == "min_mae" else 0.0))
    for s, vals in CLIP.items():
        for k, (r1, r5) in enumerate(vals):
            write_run(tmp_path, s, k, {"setting": s, "fold": k, "kind": "clip", "status": "ok", "recall@1": r1,
                                       "recall@5": r5, "random_recall@1": 1 / 256, "random_recall@5": 5 / 256})
    return tmp_path


def build(cohort: Path, **kw):
    res = RR.load_runs(RR.discover_runs(cohort))
    pg = T.per_gene_table(res.genes)
    a1 = T.build_table_a1(SETTINGS, res, weights={}, n_folds=4, per_gene=pg, **kw)
    return res, pg, a1


def test_mean_std_ddof1(cohort: Path) -> None:
    res, _, a1 = build(cohort)
    row = a1.set_index("setting").loc["late_concat_token"]
    sp = [0.80, 0.82, 0.84, 0.82]
    mean = sum(sp) / 4  # 0.82
    std = math.sqrt(sum((v - mean) ** 2 for v in sp) / 3)  # sample std: sqrt(0.0008/3)
    assert row["spearman_mean"] == pytest.approx(0.82)
    assert row["spearman_std"] == pytest.approx(std)
    assert row["spearman_std"] == pytest.approx(0.016329931618554522)
    assert row["spearman"] == "0.820 ± 0.016"
    mse = [0.70, 0.66, 0.65, 0.69]
    assert row["mse_mean"] == pytest.approx(0.675)
    assert row["mse_std"] == pytest.approx(np.std(mse, ddof=1))
    assert row["n_folds_ok"] == 4 and row["status"] == "ok"
    # setting fields, morph init, family
    assert row["fusion_stage"] == "late" and row["freeze_morph"] == "yes" and row["expr_aggregation"] == "token"
    assert row["morph_init"] == "random-init"  # vit_s without encoders.vit_s.weights
    assert row["family"] == "late fusion" and row["paper_row"] == "26"
    assert a1.set_index("setting").loc["morph_vit_s", "family"] == "morph-only"
    assert a1.set_index("setting").loc["expr_mlp_token", "family"] == "expr-only"
    # CLIP settings are not in Table A.1
    assert "clip_token" not in set(a1["setting"])


def test_pretrained_when_weights_configured(cohort: Path) -> None:
    res = RR.load_runs(RR.discover_runs(cohort))
    a1 = T.build_table_a1(SETTINGS, res, weights={"vit_s": "w.safetensors"}, n_folds=4)
    assert a1.set_index("setting").loc["morph_vit_s", "morph_init"] == "pretrained"
    assert a1.set_index("setting").loc["expr_mlp_token", "morph_init"] == "-"


def test_unrunnable_and_missing_runs_are_listed(cohort: Path) -> None:
    # remove one fold of expr_mlp_token: its row keeps 3 folds and says which fold is missing
    (cohort / "runs" / "expr_mlp_token" / "fold2" / "metrics.json").unlink()
    settings = dict(SETTINGS)
    settings["late_phikon"] = ModelSetting.from_dict("late_phikon", {
        "kind": "regression", "fusion_stage": "late", "fusion_strategy": "add", "morph_encoder": "phikon",
        "freeze_morph": True, "expr_encoder": "mlp", "expr_aggregation": "tile"})
    settings["never_ran"] = ModelSetting.from_dict("never_ran", {
        "kind": "regression", "fusion_stage": "early", "fusion_strategy": "add", "morph_encoder": "vit_s",
        "expr_encoder": "mlp", "expr_aggregation": "token"})
    res = RR.load_runs(RR.discover_runs(cohort))
    a1 = T.build_table_a1(settings, res, weights={}, n_folds=4).set_index("setting")
    assert a1.loc["morph_conch", "status"] == "missing weights: conch (set encoders.conch.weights)"
    assert a1.loc["late_phikon", "status"] == "missing weights: phikon (set encoders.phikon.weights)"
    assert math.isnan(a1.loc["morph_conch", "spearman_mean"]) and a1.loc["morph_conch", "spearman"] == "n/a"
    assert a1.loc["never_ran", "status"].startswith("no runs found")
    assert a1.loc["expr_mlp_token", "status"] == "missing runs: fold2"
    assert a1.loc["expr_mlp_token", "n_folds_ok"] == 3
    assert a1.loc["expr_mlp_token", "spearman_mean"] == pytest.approx(np.mean([0.70, 0.74, 0.71]))
    # every configured regression setting has a row, in config order
    assert list(a1.index) == [n for n in settings if not n.startswith("clip_")]
    # and the rendered markdown row carries the reason
    md = R.render_markdown(a1.reset_index(), T.A1_COLUMNS)
    line = next(ln for ln in md.splitlines() if ln.startswith("| morph\\_conch "))
    assert "missing weights: conch (set encoders.conch.weights)" in line


def test_failed_fold_status(cohort: Path) -> None:
    write_run(cohort, "morph_vit_s", 3, {"setting": "morph_vit_s", "fold": 3, "kind": "regression",
                                         "status": "diverged"})
    res = RR.load_runs(RR.discover_runs(cohort))
    a1 = T.build_table_a1(SETTINGS, res, weights={}, n_folds=4).set_index("setting")
    assert a1.loc["morph_vit_s", "status"] == "not ok: fold3 (diverged)"
    assert a1.loc["morph_vit_s", "n_folds_ok"] == 3


def test_best_marked_per_column(cohort: Path) -> None:
    _, _, a1 = build(cohort)
    a1 = a1.set_index("setting")
    assert a1["spearman_best"].sum() == 1 and a1.loc["late_concat_token", "spearman_best"]
    assert a1.loc["late_concat_token", "pearson_best"]
    # lower is better for MSE: late_concat_token has mean MSE 0.675, the lowest
    assert a1["mse_best"].sum() == 1 and a1.loc["late_concat_token", "mse_best"]
    assert not a1.loc["morph_vit_s", "mse_best"]  # the highest MSE is not marked


def test_best_lower_is_better_for_mse_when_it_differs() -> None:
    folds = pd.DataFrame({
        "setting": ["a", "a", "b", "b"], "fold": [0, 1, 0, 1], "kind": "regression", "status": "ok", "path": "",
        "spearman": [0.9, 0.9, 0.5, 0.5], "pearson": [0.1, 0.1, 0.6, 0.6], "mse": [2.0, 2.0, 1.0, 1.0],
        "mae": 0.0})
    res = RR.RunResults(folds=folds.reindex(columns=RR.FOLD_COLUMNS), genes=pd.DataFrame(columns=RR.GENE_COLUMNS))
    a1 = T.build_table_a1({"a": ModelSetting("a"), "b": ModelSetting("b")}, res, weights={},
                          n_folds=2).set_index("setting")
    assert a1.loc["a", "spearman_best"] and not a1.loc["b", "spearman_best"]
    assert a1.loc["b", "pearson_best"] and not a1.loc["a", "pearson_best"]
    assert a1.loc["b", "mse_best"] and not a1.loc["a", "mse_best"]
    md = R.render_markdown(a1.reset_index(), T.A1_COLUMNS)
    assert "**0.900 ± 0.000**" in md and "**1.000 ± 0.000**" in md and "**2.000" not in md
    tex = R.render_latex(a1.reset_index(), T.A1_COLUMNS)
    assert r"$\mathbf{0.900 \pm 0.000}$" in tex and r"$\mathbf{1.000 \pm 0.000}$" in tex
    assert r"$2.000 \pm 0.000$" in tex


def test_ttests_and_holm_by_hand(cohort: Path) -> None:
    res, _, a1 = build(cohort)
    baseline = T.resolve_baseline("best_morph_only", a1)
    assert baseline == "morph_vit_s"  # the only morph-only setting with results (conch has no weights)
    tt = ES.paired_ttests(res.folds, baseline, metrics=T.METRICS)
    sp = tt[tt["metric"] == "spearman"].set_index("setting")
    assert set(sp.index) == {"late_concat_token", "expr_mlp_token", "min_mae"}
    # by hand: paired differences late_concat_token - morph_vit_s
    d = np.array([0.80, 0.82, 0.84, 0.82]) - np.array([0.60, 0.65, 0.66, 0.61])  # .20 .17 .18 .21
    t_hand = d.mean() / (d.std(ddof=1) / math.sqrt(4))
    assert sp.loc["late_concat_token", "t_stat"] == pytest.approx(t_hand)
    assert sp.loc["late_concat_token", "mean_diff"] == pytest.approx(0.19)
    assert sp.loc["late_concat_token", "n_folds"] == 4
    from scipy import stats

    p_hand = {s: 2 * stats.t.sf(abs(sp.loc[s, "t_stat"]), df=3) for s in sp.index}
    for s in sp.index:
        assert sp.loc[s, "p_value"] == pytest.approx(p_hand[s])
    # Holm by hand over the three spearman comparisons
    order = sorted(p_hand, key=p_hand.get)
    m = 3
    adj, running = {}, 0.0
    for i, s in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_hand[s]))
        adj[s] = running
    for s in sp.index:
        assert sp.loc[s, "p_holm"] == pytest.approx(adj[s])
    assert sp.loc["late_concat_token", "better_than_baseline"]
    mse = tt[tt["metric"] == "mse"].set_index("setting")
    assert mse.loc["late_concat_token", "better_than_baseline"]  # lower MSE is better
    assert mse.loc["late_concat_token", "mean_diff"] < 0


def test_holm_known_values() -> None:
    # p = [0.01, 0.04, 0.03, nan, 0.2]: sorted 0.01*4=0.04, 0.03*3=0.09, 0.04*2=0.08->0.09, 0.2*1=0.2
    adj = ES.holm([0.01, 0.04, 0.03, float("nan"), 0.2])
    assert adj[0] == pytest.approx(0.04)
    assert adj[2] == pytest.approx(0.09)
    assert adj[1] == pytest.approx(0.09)
    assert math.isnan(adj[3])
    assert adj[4] == pytest.approx(0.2)
    assert ES.holm([0.6, 0.9]).tolist() == [1.0, 1.0]
    try:
        from statsmodels.stats.multitest import multipletests
    except ImportError:  # pragma: no cover
        return
    p = np.array([0.001, 0.2, 0.03, 0.04, 0.5, 0.011])
    np.testing.assert_allclose(ES.holm(p), multipletests(p, method="holm")[1])


def test_explicit_and_unknown_baseline(cohort: Path) -> None:
    res, _, a1 = build(cohort)
    assert T.resolve_baseline("min_mae", a1) == "min_mae"
    with pytest.raises(InputError, match="tables.baseline"):
        T.resolve_baseline("nope", a1)
    tt = ES.paired_ttests(res.folds, "min_mae", metrics=T.METRICS)
    assert set(tt["baseline"]) == {"min_mae"} and "min_mae" not in set(tt["setting"])


def test_per_gene_and_min_mae_comparison(cohort: Path) -> None:
    res, pg, a1 = build(cohort)
    g = pg.set_index(["setting", "gene"])
    # late_concat_token G1 spearman = fold mean + 0.05
    vals = np.array([0.80, 0.82, 0.84, 0.82]) + 0.05
    assert g.loc[("late_concat_token", "G1"), "spearman_mean"] == pytest.approx(vals.mean())
    assert g.loc[("late_concat_token", "G1"), "spearman_std"] == pytest.approx(vals.std(ddof=1))
    # Min-MAE G1 = its mean + 0.07, G2 = its mean - 0.07
    mm = np.array([0.72, 0.73, 0.72, 0.74])
    exp_g2 = ((np.array([0.60, 0.65, 0.66, 0.61]) - 0.05) - (mm - 0.07)).mean()
    assert g.loc[("morph_vit_s", "G2"), "delta_spearman_vs_min_mae"] == pytest.approx(exp_g2)
    assert g.loc[("morph_vit_s", "G1"), "fold_wins_spearman"] == 0
    assert g.loc[("late_concat_token", "G1"), "fold_wins_spearman"] == 4
    assert bool(g.loc[("late_concat_token", "G2"), "beats_min_mae_spearman"])
    assert math.isnan(g.loc[("min_mae", "G1"), "delta_spearman_vs_min_mae"])
    # summary in Table A.1
    assert a1.set_index("setting").loc["late_concat_token", "genes_beating_min_mae"] == "2/2"
    assert a1.set_index("setting").loc["morph_vit_s", "genes_beating_min_mae"] == "0/2"


def test_table_a2_recall_and_random(cohort: Path) -> None:
    res = RR.load_runs(RR.discover_runs(cohort))
    a2 = T.build_table_a2(SETTINGS, res, weights={}, n_folds=4).set_index("setting")
    assert list(a2.index) == ["clip_token", "clip_tile", "random"]
    r1 = [0.06, 0.065, 0.058, 0.061]
    assert a2.loc["clip_token", "recall@1_mean"] == pytest.approx(np.mean(r1))
    assert a2.loc["clip_token", "recall@1_std"] == pytest.approx(np.std(r1, ddof=1))
    assert a2.loc["clip_token", "recall@1_best"] and not a2.loc["clip_tile", "recall@1_best"]
    assert a2.loc["random", "recall@1_mean"] == pytest.approx(1 / 256)
    assert not a2.loc["random", "recall@1_best"]
    assert a2.loc["clip_tile", "expr_aggregation"] == "tile"


def test_rendering_markdown_and_latex_structure(cohort: Path) -> None:
    _, _, a1 = build(cohort)
    md = R.render_markdown(a1, T.A1_COLUMNS, title="Table A.1", notes=["note_with_underscore"])
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    ncol = len(T.A1_COLUMNS)
    # header, separator and one line per row, each with ncol cells (escaped pipes do not count)
    assert len(lines) == len(a1) + 2
    for ln in lines:
        assert len(re.findall(r"(?<!\\)\|", ln)) == ncol + 1
    assert re.fullmatch(r"\|(:---|---:)(\|(:---|---:))*\|", lines[1])
    assert "late\\_concat\\_token" in md and "late_concat_token" not in md.replace("\\_", "#")
    assert "note\\_with\\_underscore" in md

    tex = R.render_latex(a1, T.A1_COLUMNS, caption="Table A.1 (cohort_1)", label="tab:a1")
    assert tex.count(r"\begin{tabular}") == 1 and tex.count(r"\end{tabular}") == 1
    assert tex.count(r"\begin{table}") == tex.count(r"\end{table}") == 1
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    spec = re.search(r"\\begin\{tabular\}\{([lr]+)\}", tex).group(1)
    assert len(spec) == ncol
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    assert len(body) == len(a1)
    for ln in body:
        assert ln.endswith(r"\\")
        assert len(re.findall(r"(?<!\\)&", ln)) == ncol - 1
        assert re.search(r"(?<!\\)_", ln.replace(r"\_", "")) is None  # every underscore escaped
        assert ln.count("{") == ln.count("}")
    assert r"late\_concat\_token" in tex and r"cohort\_1" in tex
    assert "±" not in tex and "↑" not in tex


def test_escaping_special_characters() -> None:
    assert R.tex_escape("a_b & 50% $x$ #1 {y} ~ ^ \\") == (
        r"a\_b \& 50\% \$x\$ \#1 \{y\} \textasciitilde{} \textasciicircum{} \textbackslash{}")
    assert R.md_escape("a_b|c*d") == r"a\_b\|c\*d"
    df = pd.DataFrame({"setting": ["x|y_z"], "status": ["ok"]})
    md = R.render_markdown(df, [R.Column("setting", "Setting"), R.Column("status", "Status")])
    assert md.splitlines()[2] == r"| x\|y\_z | ok |"


def test_metrics_validation(tmp_path: Path) -> None:
    p = write_run(tmp_path, "s", 0, {"setting": "s", "fold": 0, "kind": "regression", "status": "ok",
                                     "mean": {"pearson": 0.1, "mse": 1.0}})
    with pytest.raises(InputError, match=r"field 'mean.spearman'"):
        RR.load_runs([p])
    p = write_run(tmp_path, "t", 1, {"setting": "other", "fold": 1, "kind": "regression", "status": "ok",
                                     "mean": {"pearson": 0.1, "spearman": 0.1, "mse": 1.0}})
    with pytest.raises(InputError, match="does not match the run directory"):
        RR.load_runs([p])
    with pytest.raises(InputError, match="metrics file not found"):
        RR.load_runs([tmp_path / "runs" / "u" / "fold0"])


def test_ridge_rows_included(cohort: Path) -> None:
    for k in range(4):
        write_run(cohort, "ridge_vit_s", k, regression_payload("ridge_vit_s", k, 0.5 + k / 100, 0.5, 1.5))
    res, _, a1 = build(cohort)
    r = a1.set_index("setting").loc["ridge_vit_s"]
    assert r["family"] == "baseline (ridge)" and r["morph_encoder"] == "vit_s"
    assert r["spearman_mean"] == pytest.approx(0.515)
    # ridge is a baseline, not a morph-only setting
    assert T.resolve_baseline("best_morph_only", a1) == "morph_vit_s"


def test_make_tables_and_cross_cohort(cohort: Path, tmp_path: Path) -> None:
    out = cohort / "tables"
    written = T.make_tables(RR.discover_runs(cohort), out, settings=SETTINGS, weights={}, cfg=TABLES, n_folds=4,
                            cohort="demo", config={"seed": 0}, metadata_json=out / "run_metadata.json",
                            metadata_md=out / "run_metadata.md")
    for name in ("table_a1.csv", "table_a1.md", "table_a1.tex", "table_a2.csv", "table_a2.md", "table_a2.tex",
                 "per_gene.csv", "ttests.csv", "run_metadata.json", "run_metadata.md"):
        assert written[name].exists() and written[name].stat().st_size > 50, name
    a1 = pd.read_csv(out / "table_a1.csv")
    assert {"spearman_mean", "spearman_std", "spearman", "spearman_best"} <= set(a1.columns)
    assert a1["spearman_mean"].dtype == float
    meta = json.loads((out / "run_metadata.json").read_text())
    assert meta["packages"]["pandas"] == pd.__version__
    assert meta["settings"]["morph_conch"]["runnable"] is False
    assert len(meta["runs"]) == 16 + 8
    # deterministic: regenerating gives identical tables
    before = (out / "table_a1.md").read_text()
    T.make_tables(RR.discover_runs(cohort), out, settings=SETTINGS, weights={}, n_folds=4, cohort="demo")
    assert (out / "table_a1.md").read_text() == before

    other = pd.read_csv(out / "table_a1.csv")
    other["spearman_mean"] = other["spearman_mean"] - 0.1
    other.to_csv(tmp_path / "other.csv", index=False)
    cc = T.make_cross_cohort({"demo": out / "table_a1.csv", "c2": tmp_path / "other.csv"},
                             tmp_path / "cc.csv", tmp_path / "cc.md").set_index("setting")
    assert cc.loc["late_concat_token", "demo:spearman_mean"] == pytest.approx(0.82)
    assert cc.loc["late_concat_token", "spearman_mean_across"] == pytest.approx(0.77)
    assert "**" in (tmp_path / "cc.md").read_text()


def test_weights_checksum_in_metadata(cohort: Path, tmp_path: Path) -> None:
    w = tmp_path / "w.bin"
    w.write_bytes(b"abc")
    res = RR.load_runs(RR.discover_runs(cohort))
    meta = M.run_metadata(cohort="demo", config={}, settings=SETTINGS, reasons={}, results=res,
                          weights={"vit_s": str(w), "conch": str(tmp_path / "no"), "uni": None})
    assert meta["weights"]["vit_s"]["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert meta["weights"]["conch"]["exists"] is False


def test_pretrained_read_from_runs(cohort: Path) -> None:
    for k, (sp, pe, mse) in enumerate(FOLDS["morph_vit_s"]):
        payload = regression_payload("morph_vit_s", k, sp, pe, mse)
        payload["pretrained"] = True
        write_run(cohort, "morph_vit_s", k, payload)
    res = RR.load_runs(RR.discover_runs(cohort))
    a1 = T.build_table_a1(SETTINGS, res, weights={}, n_folds=4).set_index("setting")
    assert a1.loc["morph_vit_s", "morph_init"] == "pretrained"  # metrics.json wins over the config
    assert a1.loc["late_concat_token", "morph_init"] == "random-init"  # no field: config (no vit_s weights)


REPO = Path(__file__).resolve().parents[1]
# Stand-in for workflow/rules/fusion.smk's `fusion_tables` rule: the same inputs, outputs and params
# (plain data: settings as dicts, the tables section as a dict), running the real adapter script.
STANDIN_RULE = '''
rule fusion_tables:
    input:
        metrics=lambda w: sorted(str(p) for p in Path(f"results/{w.cohort}/fusion/runs").glob("*/fold*/metrics.json")),
    output:
        a1_csv="results/{cohort}/fusion/tables/table_a1.csv",
        a1_md="results/{cohort}/fusion/tables/table_a1.md",
        a1_tex="results/{cohort}/fusion/tables/table_a1.tex",
        a2_csv="results/{cohort}/fusion/tables/table_a2.csv",
        a2_md="results/{cohort}/fusion/tables/table_a2.md",
        a2_tex="results/{cohort}/fusion/tables/table_a2.tex",
        per_gene="results/{cohort}/fusion/tables/per_gene.csv",
        ttests="results/{cohort}/fusion/tables/ttests.csv",
        metadata_json="results/{cohort}/fusion/tables/run_metadata.json",
        metadata_md="results/{cohort}/fusion/tables/run_metadata.md",
    params:
        settings_file="config/experiments/table_a1.yaml",
        settings=%(settings)r,
        weights={"vit_s": None, "conch": None},
        tables=%(tables)r,
        n_folds=4,
        config={"seed": 0},
        samples=[{"sample_id": "s1", "patient_id": "p1", "he_path": "he.tif", "he_mpp": "0.5"}],
    log:
        "results/{cohort}/logs/fusion_tables/tables.log",
    script:
        "%(script)s"
'''


def test_tables_rule_runs_in_snakemake(tmp_path: Path) -> None:
    """scripts/fusion_tables.py under real Snakemake (rule stand-in with fusion.smk's params)."""
    import dataclasses
    import subprocess
    import sys

    script = REPO / "scripts" / "fusion_tables.py"
    (tmp_path / "Snakefile").write_text("from pathlib import Path\n" + STANDIN_RULE % {
        "settings": SETTING_FIELDS, "tables": dataclasses.asdict(TABLES), "script": script})
    cohort_dir = tmp_path / "results" / "demo" / "fusion"
    for s, vals in FOLDS.items():
        for k, (sp, pe, mse) in enumerate(vals):
            write_run(cohort_dir, s, k, regression_payload(s, k, sp, pe, mse))
    for s, vals in CLIP.items():
        for k, (r1, r5) in enumerate(vals):
            write_run(cohort_dir, s, k, {"setting": s, "fold": k, "kind": "clip", "status": "ok", "recall@1": r1,
                                         "recall@5": r5, "random_recall@1": 1 / 256, "random_recall@5": 5 / 256})
    res = subprocess.run([sys.executable, "-m", "snakemake", "-c1", "results/demo/fusion/tables/table_a1.csv"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    tables = cohort_dir / "tables"
    a1 = pd.read_csv(tables / "table_a1.csv").set_index("setting")
    assert a1.loc["morph_conch", "status"] == "missing weights: conch (set encoders.conch.weights)"
    assert a1.loc["late_concat_token", "spearman_mean"] == pytest.approx(0.82)
    assert "Holm" not in (tables / "ttests.csv").read_text()  # a CSV, not prose
    log = tmp_path / "results" / "demo" / "logs" / "fusion_tables" / "tables.log"
    assert log.read_text().count("rule fusion_tables done") == 1
    meta = json.loads((tables / "run_metadata.json").read_text())
    assert meta["cohort"] == "demo" and meta["config"]["samples"][0]["sample_id"] == "s1"
