"""Leave-one-cohort-out transfer and few-shot adaptation (rule ``slides_transfer``, one job per target).

For target cohort ``c`` (sheet column ``cohort``) and the primary setting (``slides.poolings[0]``):

* source = every other cohort's slides, split by patient into fit / validation (``splits.val_fraction``
  of the source patients, seeded); RNA encoder fit and alignment trained on the source only;
* ``zero_shot``: evaluated on all of the target's slides (retrieval among them; soft-kNN with the
  source slides as reference library);
* for each fraction ``f`` of ``slides.transfer.fractions`` and each of ``repeats`` seeded draws,
  ``max(1, ceil(f x n_target_patients))`` target patients are the *shots*; their slides are removed
  from the evaluation set and
  - ``reference_only``: added to the soft-kNN reference library (no training), and
  - ``finetune``: also used to fine-tune the source model (source fit slides + shots,
    ``finetune_epochs`` at ``finetune_lr``; model selection on the source validation slides plus
    the shots — no held-out target slide is used), reference library as for ``reference_only``.

Writes one JSON: ``records`` (target, mode, fraction, repeat, shots, n_eval, recall@k both ways and
chance, mean R² / Pearson over grounded / other / null sets, per-set R²) and the run's metadata.
Few evaluated slides: recall@k only for k < n_eval, per-set R² / Pearson only with at least 3 of them
(:mod:`morphomol.studies.slides.evaluate`), NaN otherwise; fewer than 10 is logged as a warning and flagged
in the transfer table.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("slides.transfer")


def _choose_val(patients: np.ndarray, frac: float, seed: int) -> np.ndarray:
    uniq = np.array(sorted(set(patients.tolist())), dtype=object)
    if len(uniq) < 2:
        raise InputError(f"the source cohorts have {len(uniq)} patient(s)", field="slides.transfer",
                         expected="at least 2 source patients (one for validation)")
    n_val = min(max(int(round(frac * len(uniq))), 1), len(uniq) - 1)
    val = set(np.random.default_rng([int(seed), 17]).permutation(uniq)[:n_val].tolist())
    return np.array([p in val for p in patients])


def _record(model: Any, data: Any, tables: Any, ref_i: np.ndarray, eval_i: np.ndarray, cfg: Any) -> dict[str, Any]:
    from morphomol.studies.slides.align import embed_data
    from morphomol.studies.slides.evaluate import FEW_TEST_SLIDES, recall_reason, retrieval, set_metrics, soft_knn
    from morphomol.studies.slides.run import summarise

    zs, zr = embed_data(model, data, cfg.align.batch_size)
    if len(eval_i) >= 2:
        ret = retrieval(zs[eval_i], zr[eval_i], cfg.retrieval_ks)
    else:  # a single evaluated slide: no retrieval at all
        nan = {f"recall@{k}": float("nan") for k in cfg.retrieval_ks}
        ret = {"slide_to_rna": nan, "rna_to_slide": dict(nan), "chance": dict(nan),
               "not_computable": {f"recall@{k}": recall_reason(k, len(eval_i)) for k in cfg.retrieval_ks}}
    if len(eval_i) < FEW_TEST_SLIDES:
        log.warning("transfer: %d evaluated slide(s) (< %d): too few for retrieval, R² and Pearson to mean much%s",
                    len(eval_i), FEW_TEST_SLIDES, "".join(f"; {k} not computable" for k in ret["not_computable"]))
    temp = cfg.prompting.knn_temperature or float(1.0 / model.scale.detach())
    yhat = soft_knn(zs[eval_i], zr[ref_i], tables.Y[ref_i], cfg.prompting.knn_k, temp)
    ps = set_metrics(tables.Y[eval_i], yhat, tables.set_names)
    out: dict[str, Any] = {"n_eval": int(len(eval_i)), "n_reference": int(len(ref_i))}
    for direction in ("slide_to_rna", "rna_to_slide", "chance"):
        for k, v in ret[direction].items():
            out[f"{direction}:{k}"] = v
    out.update(summarise(ps, tables, cfg.gene_sets.grounded))
    r = ps["pearson"].to_numpy()[np.isin(tables.set_names, list(cfg.gene_sets.grounded))]
    out["mean_pearson_grounded"] = float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")
    out["r2"] = {s: float(ps.at[s, "r2"]) for s in tables.set_names}
    return out


def run_transfer(*, target: str, embeddings: Mapping[str, str | Path], expression: str | Path, scores: str | Path,
                 sets: str | Path, cfg: Any, val_fraction: float, seed: int, out: str | Path,
                 rna_weights: str | None = None, rna_overrides: Mapping[str, Any] | None = None,
                 threads: int | None = None) -> dict[str, Any]:
    """The ``slides_transfer`` rule for one target cohort (see the module doc). ``cfg``: SlidesConfig.
    ``embeddings``: slide -> its embedding (the only H&E input: no tile features)."""
    from morphomol.studies.slides.align import AlignData, build_model, train_align
    from morphomol.studies.slides.data import load_cohort_tables, make_inputs
    from morphomol.studies.slides.embed import make_rna_encoder, reduce_slides
    from morphomol.util.hashing import digest, ids_digest
    from morphomol.util.jsonio import write_json

    t0 = time.perf_counter()
    tables = load_cohort_tables(expression, scores, sets)
    is_tgt = tables.cohorts == target
    if not is_tgt.any():
        raise InputError(f"no slide of cohort '{target}'", field="cohort", expected="a cohort of the sample sheet")
    if is_tgt.all():
        raise InputError(f"every slide is of cohort '{target}': nothing to transfer from", field="cohort",
                         expected="at least two cohorts in the sample sheet")
    src_i = np.flatnonzero(~is_tgt)
    is_val = _choose_val(tables.patients[src_i], val_fraction, seed)
    fit_i, val_i = src_i[~is_val], src_i[is_val]
    tgt_i = np.flatnonzero(is_tgt)
    inputs = make_inputs(cfg.primary, embeddings, tables.samples, cfg=cfg)
    bag = inputs.bag
    inputs, _ = reduce_slides(inputs, fit_i, cfg.slide_pca_components)
    rna_enc = make_rna_encoder(cfg.rna_encoder, n_components=cfg.pca_components, n_genes=cfg.pca_genes,
                               min_mean=cfg.pca_min_mean, weights=rna_weights,
                               overrides=rna_overrides).fit_matrix(tables.expr, fit_i)
    data = AlignData(list(tables.samples), {**inputs.arrays(), "rna": rna_enc.transform_matrix(tables.expr)},
                     inputs.bags)
    fp = {"target": target, "config": digest(cfg), "ids": ids_digest(tables.samples)}
    work = Path(out).parent / f".{Path(out).stem}"
    model = build_model(data.subset(fit_i), cfg.align, bag=bag, seed=seed)
    res = train_align(model, data.subset(fit_i), data.subset(val_i), cfg.align, work_dir=work / "source", seed=seed,
                      fingerprint={**fp, "run": "source"}, threads=threads)
    ref0 = np.concatenate([fit_i, val_i])
    records = [{"target": target, "mode": "zero_shot", "fraction": 0.0, "repeat": 0, "n_shot_patients": 0,
                "n_shot_slides": 0, **_record(model, data, tables, ref0, tgt_i, cfg)}]
    tgt_pat = np.array(sorted(set(tables.patients[tgt_i].tolist())), dtype=object)
    for f in cfg.transfer.fractions:
        n_shot = max(1, math.ceil(f * len(tgt_pat)))
        if n_shot >= len(tgt_pat):
            log.warning("fraction %g: %d shot patients leave no target patient to evaluate; skipped", f, n_shot)
            continue
        for r in range(cfg.transfer.repeats):
            shots = set(np.random.default_rng([int(seed), 71, r, int(round(f * 1e6))]).permutation(tgt_pat)[:n_shot])
            is_shot = np.isin(tables.patients[tgt_i], list(shots))
            shot_i, eval_i = tgt_i[is_shot], tgt_i[~is_shot]
            ref = np.concatenate([ref0, shot_i])
            base = {"target": target, "fraction": float(f), "repeat": r, "n_shot_patients": int(n_shot),
                    "n_shot_slides": int(len(shot_i))}
            records.append({**base, "mode": "reference_only", **_record(model, data, tables, ref, eval_i, cfg)})
            tuned = copy.deepcopy(model)
            train_align(tuned, data.subset(np.concatenate([fit_i, shot_i])), data.subset(np.concatenate([val_i, shot_i])),
                        cfg.align, work_dir=work / f"f{f:g}_r{r}", seed=seed + r, epochs=cfg.transfer.finetune_epochs,
                        lr=cfg.transfer.finetune_lr, fingerprint={**fp, "run": f"{f}:{r}"}, threads=threads)
            records.append({**base, "mode": "finetune", **_record(tuned, data, tables, ref, eval_i, cfg)})
    try:
        work.rmdir()
    except OSError:
        pass
    result = {"target": target, "setting": cfg.primary, "n_source": int(len(src_i)), "n_target": int(len(tgt_i)),
              "n_target_patients": int(len(tgt_pat)), "source_best_epoch": res.best_epoch,
              "seconds": time.perf_counter() - t0, "records": records}
    write_json(out, result)
    z = records[0]
    k = f"recall@{cfg.retrieval_ks[-1]}"
    log.info("transfer -> %s: zero-shot %s %.2f (chance %.2f), R² grounded %.2f; %d adapted runs in %.1f s", target, k,
             z[f"slide_to_rna:{k}"], z[f"chance:{k}"], z["mean_r2_grounded"], len(records) - 1, result["seconds"])
    return result
