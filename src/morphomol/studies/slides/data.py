"""What a slides training job reads, in memory: slides, partitions, RNA, gene-set scores, inputs.

:func:`load_cohort_tables` reads the cohort-level tables (``expression.h5ad``, ``scores.parquet``,
``sets.json``); :func:`slide_partitions` turns the shared unit-level fold (``splits/fold{k}.parquet``,
rows = tiles) into one partition per slide, asserting patient grouping; :func:`make_inputs` builds
the frozen slide inputs of a setting (mean vector, padded bag, or a frozen slide encoder's vector).
"""

from __future__ import annotations

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
    L: np.ndarray                 # (n, G) log2 expression
    Y: np.ndarray                 # (n, S) ssGSEA ES
    set_names: list[str]
    set_meta: dict[str, Any]
    set_index: list[np.ndarray]   # genes of each set as column indices of L

    def is_null(self) -> np.ndarray:
        return np.array([bool(self.set_meta[s].get("null")) for s in self.set_names])


def load_cohort_tables(expression: str | Path, scores: str | Path, sets: str | Path) -> CohortTables:
    import anndata as ad

    from morphomol.util.jsonio import read_json

    a = ad.read_h5ad(expression)
    samples = [str(s) for s in a.obs_names]
    genes = [str(g) for g in a.var_names]
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
    return CohortTables(samples=samples, patients=a.obs["patient_id"].astype(str).to_numpy(),
                        cohorts=a.obs["cohort"].astype(str).to_numpy(), genes=genes,
                        L=np.asarray(a.X, np.float64), Y=sc.loc[samples, names].to_numpy(np.float64), set_names=names,
                        set_meta=meta, set_index=index)


def slide_partitions(split: pd.DataFrame, samples: list[str], *, file: object = None) -> np.ndarray:
    """Partition (fit | val | test) of every slide of ``samples`` from a unit-level split; asserts that
    every slide's tiles share one partition and that no patient spans two partitions."""
    from morphomol.splits import check_fold

    per = split.groupby("sample_id")["partition"].nunique()
    if (per > 1).any():
        raise AssertionError(f"slide {per.index[per > 1][0]} has tiles in two partitions")
    slides = split.drop_duplicates("sample_id")[["sample_id", "patient_id", "partition"]].astype(str)
    check_fold(slides, "patient_id", "patient_id")
    part = dict(zip(slides["sample_id"], slides["partition"], strict=True))
    missing = [s for s in samples if s not in part]
    if missing:
        raise InputError(f"{len(missing)} slide(s) not in the split: {', '.join(missing[:5])}", file=file,
                         expected="splits computed over the cohort's current slides")
    return np.array([part[s] for s in samples])


def make_inputs(setting: str, features: Mapping[str, str | Path], samples: list[str], *, cfg: Any,
                seed: int) -> tuple[dict[str, np.ndarray], bool]:
    """(frozen slide inputs, whether the model pools a bag) of slide encoder ``setting``."""
    from morphomol.studies.slides.embed import slide_inputs
    from morphomol.studies.slides.slide_encoders import get_slide_encoder

    spec = get_slide_encoder(setting)
    arrays = slide_inputs(features, samples, bag=spec.bag, max_tiles=cfg.abmil_max_tiles, seed=seed)
    if spec.requires_weights:
        from morphomol.studies.slides.models import frozen_slide_vectors, load_frozen_abmil

        weights = cfg.slide_encoder_weights.get(setting)
        if not weights:
            raise InputError(f"slide encoder '{setting}' needs weights", field=f"slides.slide_encoder_weights.{setting}",
                             expected="a local safetensors file")
        pool = load_frozen_abmil(weights, arrays["bag"].shape[-1])
        return {"slide": frozen_slide_vectors(pool, arrays["bag"], arrays["mask"])}, False
    if spec.trainable:
        return {"bag": arrays["bag"], "mask": arrays["mask"]}, True
    return {"slide": arrays["slide"]}, False
