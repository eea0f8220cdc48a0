"""What a slides training job reads: slides, partitions, RNA, gene-set scores, slide inputs.

:func:`load_cohort_tables` opens the cohort-level tables (``expression.h5ad`` as an
:class:`~morphomol.studies.slides.rna.ExpressionMatrix`, read by rows; ``scores.parquet``; ``sets.json``);
:func:`slide_partitions` gives every slide its partition in one fold of the shared fold table
(``splits/folds.parquet``, one row per (fold, slide); patient grouping asserted); :func:`make_inputs`
builds the frozen slide inputs of a setting from the per-slide embeddings
(:mod:`morphomol.studies.slides.bank`): the mean vectors (N x D), bags read per batch, or a frozen slide
encoder's vectors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError


@dataclass
class CohortTables:
    samples: list[str]
    patients: np.ndarray
    cohorts: np.ndarray
    genes: list[str]
    expr: Any                     # ExpressionMatrix: (n, G) log2 expression, read by rows
    Y: np.ndarray                 # (n, S) ssGSEA ES
    set_names: list[str]
    set_meta: dict[str, Any]
    set_index: list[np.ndarray]   # genes of each set as column indices of the expression

    def is_null(self) -> np.ndarray:
        return np.array([bool(self.set_meta[s].get("null")) for s in self.set_names])


def load_cohort_tables(expression: str | Path, scores: str | Path, sets: str | Path) -> CohortTables:
    from morphomol.studies.slides.rna import ExpressionMatrix
    from morphomol.util.jsonio import read_json

    expr = ExpressionMatrix(expression)
    samples, genes = expr.samples, expr.genes
    meta = read_json(sets, "gene sets file")["sets"]
    sc = pd.read_parquet(scores)
    sc.index = sc.index.astype(str)
    missing = [s for s in samples if s not in sc.index]
    if missing:
        raise InputError(f"no gene-set scores for {len(missing)} slide(s): {', '.join(missing[:5])}", file=scores,
                         expected="scores of every slide (rerun slides_genesets)")
    names = [s for s in meta if s in sc.columns]
    pos = {g: i for i, g in enumerate(genes)}
    index = [np.array([pos[g] for g in meta[s]["genes"] if g in pos], np.int64) for s in names]
    return CohortTables(samples=samples, patients=expr.obs["patient_id"].astype(str).to_numpy(),
                        cohorts=expr.obs["cohort"].astype(str).to_numpy(), genes=genes, expr=expr,
                        Y=sc.loc[samples, names].to_numpy(np.float64), set_names=names, set_meta=meta, set_index=index)


def slide_partitions(folds: pd.DataFrame | str | Path, fold: int, samples: list[str], *,
                     file: object = None) -> np.ndarray:
    """Partition (fit | val | test) of every slide of ``samples`` in fold ``fold`` of the fold table
    (``splits/folds.parquet``); asserts that no patient spans two partitions."""
    from morphomol.data.folds import sample_partitions

    part = sample_partitions(folds, int(fold))
    missing = [s for s in samples if s not in part]
    if missing:
        raise InputError(f"{len(missing)} slide(s) not in the fold table: {', '.join(missing[:5])}",
                         file=file if file is not None else (folds if not isinstance(folds, pd.DataFrame) else None),
                         expected="splits computed over the cohort's current slides")
    return np.array([part[s] for s in samples])


@dataclass
class SlideInputs:
    """Frozen slide inputs of a setting, rows = slides: ``slide`` (N, D) float32 vectors, or ``bags`` (a
    :class:`~morphomol.studies.slides.bank.BagSet` over every slide, read per batch)."""

    slide: np.ndarray | None = None
    bags: Any = None

    @property
    def bag(self) -> bool:
        return self.bags is not None

    def replace(self, **kw: Any) -> SlideInputs:
        return dataclasses.replace(self, **kw)

    def arrays(self) -> dict[str, np.ndarray]:
        """The in-memory per-slide arrays (``slide``; none for bags)."""
        return {} if self.slide is None else {"slide": self.slide}


def make_inputs(setting: str, embeddings: Mapping[str, str | Path], samples: list[str], *,
                cfg: Any) -> SlideInputs:
    """Frozen slide inputs of slide encoder ``setting`` from the slides' embeddings (reads those only)."""
    from morphomol.studies.slides.bank import SlideBank
    from morphomol.studies.slides.slide_encoders import get_slide_encoder

    spec = get_slide_encoder(setting)
    bank = SlideBank(embeddings, samples)
    if spec.requires_weights:
        from morphomol.studies.slides.models import frozen_slide_vectors, load_frozen_abmil

        weights = cfg.slide_encoder_weights.get(setting)
        if not weights:
            raise InputError(f"slide encoder '{setting}' needs weights", field=f"slides.slide_encoder_weights.{setting}",
                             expected="a local safetensors file")
        pool = load_frozen_abmil(weights, bank.dim)
        bags = bank.all_bags()
        step = 64
        parts = [frozen_slide_vectors(pool, *bags.read(np.arange(a, min(a + step, len(bags)))))
                 for a in range(0, len(bags), step)]
        return SlideInputs(slide=np.concatenate(parts).astype(np.float32))
    if spec.trainable:
        return SlideInputs(bags=bank.all_bags())
    return SlideInputs(slide=bank.means())
