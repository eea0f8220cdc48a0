"""The slides study at the seeds' scale (10,000 WSIs x 10,000 tiles x 1536-d, 20 k genes).

* ``slides_embed``: one slide's embedding (mean + seeded float16 bag of 512 tiles) from its feature store;
  n = tiles of the slide.
* ``slides_fold`` / ``slides_transfer``: the ``abmil`` setting (bags of 512 x 1536-d float16 tiles read per
  batch, slide PCA to 64 components from the streamed tile covariance, RNA PCA over 20 k genes) — 2 epochs,
  so that the figures measure memory and per-epoch work, not convergence; n = slides. Batches of 8 slides
  (training and evaluation), so that every size is past the batch: the batch is a constant of the job (the
  default ``align.batch_size`` 64 adds about 64 x 512 x 1536 x 4 B = 200 MB of bag tensor plus the ABMIL's
  activations, whatever the cohort).
* ``slides_genesets``: ssGSEA (50 Hallmark + 10 null sets) over 20 k genes in blocks of 32 samples (the default
  block, 256 samples, adds a constant of about 256 x 20 k x 8 B x a few copies); n = slides.
* ``slides_rna``: a counts TSV (20 k genes x n samples) read, checked, log2-CPM'd, written; n = slides.

Inputs are written with the project's writers (``write_features``, ``write_slide_embedding``, ``prepare_rna``,
``score_gene_sets``, ``make_folds``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scale import Stage

ROOT = Path(__file__).resolve().parents[2]
GMT = ROOT / "tests" / "data" / "slides_gene_sets" / "h.all.v7.0.symbols.gmt"
DIM, BAG, GENES = 1536, 512, 20_000


def _genes(n_genes: int) -> list[str]:
    from morphomol.studies.slides.genesets import read_gmt

    genes = sorted({g for v in read_gmt(GMT).values() for g in v})
    return genes + [f"BG{i:05d}" for i in range(max(0, n_genes - len(genes)))]


def _sheet(n: int) -> list[dict[str, str]]:
    # two source cohorts, two slides per patient
    return [{"sample_id": f"SL{i:06d}", "patient_id": f"P{i // 2:06d}", "cohort": f"C{(i // 2) % 2}"} for i in range(n)]


def _counts_tsv(n: int, path: Path, n_genes: int = GENES) -> None:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    genes = _genes(n_genes)
    cols = [r["sample_id"] for r in _sheet(n)]
    with open(path, "w") as fh:
        fh.write("gene\t" + "\t".join(cols) + "\n")
        for a in range(0, len(genes), 2000):
            block = rng.negative_binomial(2, 0.02, size=(min(2000, len(genes) - a), n))
            pd.DataFrame(block, index=genes[a:a + 2000]).to_csv(fh, sep="\t", header=False)


def _rna(n: int, work: Path) -> dict[str, str]:
    from morphomol.studies.slides.config import RnaConfig
    from morphomol.studies.slides.rna import prepare_rna

    _counts_tsv(n, work / "counts.tsv")
    rna = work / "rna"
    prepare_rna(sheet=_sheet(n), out_expression=rna / "expression.h5ad", out_preprocessing=rna / "preprocessing.json",
                out_genes=rna / "genes.txt", cfg=RnaConfig(), matrix=work / "counts.tsv")
    (work / "counts.tsv").unlink()
    return {"expression": str(rna / "expression.h5ad")}


# ---------------------------------------------------------------------------------------------- embed
def prepare_embed(n: int, work: Path) -> dict[str, Any]:
    import numpy as np

    from morphomol.data.features import write_features

    f = np.random.default_rng(0).normal(size=(n, DIM)).astype(np.float32)
    store = write_features(work / "features" / "SL000000.zarr", f, encoder="uni", chunk_rows=1024)
    return {"features": [str(store)], "samples": ["SL000000"], "out_dir": str(work / "embeddings" / "group0")}


def run_embed(kw: dict[str, Any], work: Path) -> None:
    from morphomol.studies.slides.bank import embed_slides

    embed_slides(features=kw["features"], samples=kw["samples"], out_dir=kw["out_dir"], max_tiles=BAG, seed=0)


# ---------------------------------------------------------------------------------------------- fold / transfer
def _cfg(extra: dict[str, Any] | None = None) -> Any:
    from morphomol.config import default_sections

    return default_sections(slides={"gene_sets": {"gmt": [str(GMT)], "n_null": 10, "chunk_samples": 32},
                                    "poolings": ["abmil", "mean"],
                                    "abmil_max_tiles": BAG, "slide_pca_components": 64, "pca_components": 32,
                                    "align": {"epochs": 2, "warmup_epochs": 0, "patience": 5, "batch_size": 8},
                                    "transfer": {"fractions": [0.1], "repeats": 1, "finetune_epochs": 1},
                                    **(extra or {})}).slides


def prepare_fold(n: int, work: Path) -> dict[str, Any]:
    import numpy as np

    from morphomol.splits import make_folds, sample_table
    from morphomol.studies.slides.bank import write_slide_embedding
    from morphomol.studies.slides.genesets import score_gene_sets

    sheet = _sheet(n)
    rng = np.random.default_rng(0)
    emb = {}
    for r in sheet:
        s = r["sample_id"]
        bag = rng.normal(size=(BAG, DIM)).astype(np.float16)
        p = work / "embeddings" / "group0" / f"{s}.zarr"
        write_slide_embedding(p, sample=s, mean=bag.astype(np.float32).mean(axis=0), bag=bag,
                              index=np.arange(BAG), n_tiles=10_000, max_tiles=BAG, seed=0)
        emb[s] = str(p)
    kw = _rna(n, work)
    gs = work / "genesets"
    score_gene_sets(expression=kw["expression"], gmt=[GMT], out_scores=gs / "scores.parquet", out_sets=gs / "sets.json",
                    out_coverage=gs / "coverage.tsv", cfg=_cfg().gene_sets, seed=0)
    folds = make_folds(sample_table([r["sample_id"] for r in sheet], [r["patient_id"] for r in sheet], [10_000] * n),
                       5, 0.25, 0)
    folds.to_parquet(work / "folds.parquet", index=False)
    return {**kw, "embeddings": emb, "scores": str(gs / "scores.parquet"), "sets": str(gs / "sets.json"),
            "folds": str(work / "folds.parquet")}


def run_fold(kw: dict[str, Any], work: Path) -> None:
    from morphomol.studies.slides.run import run_fold as fold

    out = work / "run"
    fold(setting="abmil", fold=0, folds=kw["folds"], embeddings=kw["embeddings"], expression=kw["expression"],
         scores=kw["scores"], sets=kw["sets"], cfg=_cfg(), seed=0, out_metrics=out / "metrics.json",
         out_predictions=out / "predictions.parquet", out_checkpoint=out / "checkpoint.safetensors",
         out_checkpoint_meta=out / "checkpoint.json", threads=1)


def run_transfer(kw: dict[str, Any], work: Path) -> None:
    from morphomol.studies.slides.transfer import run_transfer as transfer

    transfer(target="C0", embeddings=kw["embeddings"], expression=kw["expression"], scores=kw["scores"],
             sets=kw["sets"], cfg=_cfg(), val_fraction=0.25, seed=0, out=work / "transfer" / "C0.json", threads=1)


# ---------------------------------------------------------------------------------------------- RNA tables
def prepare_genesets(n: int, work: Path) -> dict[str, Any]:
    kw = _rna(n, work)
    return {**kw, "out": str(work / "genesets")}


def run_genesets(kw: dict[str, Any], work: Path) -> None:
    from morphomol.studies.slides.genesets import score_gene_sets

    out = Path(kw["out"])
    score_gene_sets(expression=kw["expression"], gmt=[GMT], out_scores=out / "scores.parquet",
                    out_sets=out / "sets.json", out_coverage=out / "coverage.tsv", cfg=_cfg().gene_sets, seed=0)


def prepare_rna(n: int, work: Path) -> dict[str, Any]:
    _counts_tsv(n, work / "counts.tsv")
    return {"matrix": str(work / "counts.tsv"), "sheet": _sheet(n), "out": str(work / "rna")}


def run_rna(kw: dict[str, Any], work: Path) -> None:
    from morphomol.studies.slides.config import RnaConfig
    from morphomol.studies.slides.rna import prepare_rna as prepare

    out = Path(kw["out"])
    prepare(sheet=kw["sheet"], out_expression=out / "expression.h5ad", out_preprocessing=out / "preprocessing.json",
            out_genes=out / "genes.txt", cfg=RnaConfig(), matrix=kw["matrix"])


STAGES = [
    Stage(name="slides_embed", unit="tiles", quick=(2_500, 5_000, 10_000), full=(5_000, 10_000, 40_000), seed_n=10_000,
          prepare=prepare_embed, run=run_embed,
          note=f"one slide's features ({DIM}-d float32) -> mean + seeded float16 bag of {BAG}"),
    Stage(name="slides_fold", unit="slides", quick=(24, 48, 96), full=(100, 200, 400), seed_n=10_000,
          prepare=prepare_fold, run=run_fold,
          note=f"abmil, bags {BAG} x {DIM}-d float16 read 8 slides per batch, slide PCA 64 (streamed covariance), "
               f"RNA PCA over {GENES:,} genes, 2 epochs"),
    Stage(name="slides_transfer", unit="slides", quick=(24, 48, 96), full=(100, 200, 400), seed_n=10_000,
          prepare=prepare_fold, run=run_transfer,
          note=f"abmil, bags {BAG} x {DIM}-d, target C0 (half the slides), source 2 epochs + 1 few-shot fine-tune"),
    Stage(name="slides_genesets", unit="slides", quick=(64, 128, 256), full=(512, 1024, 4096), seed_n=10_000,
          prepare=prepare_genesets, run=run_genesets,
          note=f"ssGSEA of 60 sets over {GENES:,} genes, blocks of 32 samples"),
    Stage(name="slides_rna", unit="slides", quick=(125, 250, 500), full=(500, 1000, 4000), seed_n=10_000,
          prepare=prepare_rna, run=run_rna,
          note=f"counts TSV ({GENES:,} genes x n samples) -> log2 CPM float32 expression.h5ad"),
]
