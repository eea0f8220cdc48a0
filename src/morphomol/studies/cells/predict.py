"""Label new cells with a trained adapter (the ``predict`` path).

The adapter directory written by ``cells_train`` holds ``cells_model.json``: the base model and processor
it was trained on, the fold's HVGs, labels, sentence length, value kind and templates. New cells (an
AnnData) are turned into cell sentences exactly as in training and labelled in either decoding mode::

    python -m morphomol.studies.cells.predict --adapter results/demo_cells/cells/runs/llm/fold0/adapter \\
        --h5ad new_cells.h5ad --out predictions.csv [--mode score|generate] [--layer raw] [--label-key cell_type]

Output CSV: ``cell_id, predicted`` (+ ``text`` for generation, ``label, correct`` when a label column is
given). HVGs the new data lack count as not expressed (logged).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError, MorphomolError
from morphomol.util.jsonio import read_json
from morphomol.util.logs import get_logger, setup_logging
from morphomol.util.offline import enforce_offline

log = get_logger("cells.predict")


def predict_cells(*, h5ad: str | Path, adapter: str | Path, out: str | Path, mode: str = "score",
                  layer: str | None = None, label_key: str | None = None, batch_size: int = 16,
                  device: str = "auto", threads: int | None = None) -> pd.DataFrame:
    """Predicted cell types of every cell of ``h5ad``; writes ``out`` (CSV) and returns it."""
    import anndata as ad
    import scipy.sparse as sp

    from morphomol.config.sections import build
    from morphomol.studies.cells.config import CellsConfig
    from morphomol.studies.cells.evaluate import Predictor
    from morphomol.studies.cells.examples import FoldExamples
    from morphomol.studies.cells.ingest import check_values
    from morphomol.studies.cells.labels import LabelMap
    from morphomol.studies.cells.labels import label_key as key_of
    from morphomol.studies.cells.prompts import load_templates
    from morphomol.studies.cells.sentences import log_normalise, sentence_strings
    from morphomol.train.runtime import Runtime, run_context
    from morphomol.util.atomic import atomic_path

    if mode not in ("score", "generate"):
        raise InputError(f"unknown mode {mode!r}", field="mode", expected="score | generate")
    adapter, h5ad = Path(adapter), Path(h5ad)
    if not adapter.is_dir():
        raise InputError("adapter directory not found" + (" (it is a file)" if adapter.exists() else ""), file=adapter,
                         field="--adapter", expected="runs/llm/fold{k}/adapter written by cells_train")
    if not h5ad.is_file():
        raise InputError("AnnData file not found" + (" (it is a directory)" if h5ad.is_dir() else ""), file=h5ad,
                         field="--h5ad", expected="an AnnData .h5ad file with the new cells")
    info = read_json(adapter / "cells_model.json", "adapter metadata")
    try:
        a = ad.read_h5ad(h5ad)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise InputError(f"cannot read the AnnData ({type(exc).__name__}: {exc})", file=h5ad, field="--h5ad",
                         expected="an AnnData .h5ad file") from None
    if layer == "raw" and a.raw is not None:
        X, genes = a.raw.X, list(a.raw.var_names)
    elif layer:
        if layer not in a.layers:
            raise InputError(f"no layer {layer!r} (layers: {sorted(a.layers)})", file=h5ad, field=f"layers/{layer}")
        X, genes = a.layers[layer], list(a.var_names)
    else:
        X, genes = a.X, list(a.var_names)
    X = sp.csr_matrix(X, dtype=np.float64)
    check_values(X, info["values"], file=h5ad, field=layer or "X")
    pos = {g: i for i, g in enumerate(genes)}
    hvg = [g for g in info["hvg"] if g in pos]
    if len(hvg) < len(info["hvg"]):
        log.warning("%d of %d training HVGs are not in %s (treated as not expressed)", len(info["hvg"]) - len(hvg),
                    len(info["hvg"]), h5ad)
    Xl = log_normalise(X, info["values"])[:, [pos[g] for g in hvg]]
    sent, n_sent = sentence_strings(Xl, hvg, int(info["n_genes"]))
    table = pd.DataFrame({"tile_id": a.obs_names.astype(str), "sample_id": "new", "index": np.arange(a.n_obs),
                          "label": "", "has_image": False, "sentence": sent.to_pylist(), "n_sentence_genes": n_sent})
    cfg = build(CellsConfig, {"eval": {"batch_size": batch_size}})
    lm = LabelMap(labels=tuple(info["labels"]), lookup={key_of(k): k for k in info["labels"]})
    with run_context(Runtime(seed=0, threads=threads, device=device)) as dev:
        from morphomol.studies.cells.base_model import load_adapter, load_base, load_processor

        processor, chat = load_processor(info["base_model"])
        model, _ = load_base(info["base_model"], cfg, dev)
        model = load_adapter(model, adapter)
        pred = Predictor(model, processor, chat, info["labels"], lm, dev, batch_size, 16)
        templates = load_templates(info["templates"], ["gene_to_type"])
        fx = FoldExamples(table, templates, organism=info["organism"], image_placeholder=chat.image, patches=None)
        exs = [fx.example(i, "gene_to_type", 0) for i in range(len(table))]
        res: dict[str, Any] = {"cell_id": table["tile_id"]}
        if mode == "score":
            res["predicted"], _ = pred.score(exs)
        else:
            res["predicted"], res["text"] = pred.generate(exs)
    df = pd.DataFrame(res)
    if label_key:
        lmap = LabelMap.read(info["label_map"]) if info.get("label_map") else lm
        df["label"] = lmap.normalise(a.obs[label_key].tolist(), file=h5ad, field=f"obs/{label_key}")
        df["correct"] = df["label"] == df["predicted"]
        log.info("accuracy %.3f on %d labelled cells", float(df["correct"].mean()), len(df))
    with atomic_path(out) as tmp:
        df.to_csv(tmp, index=False)
    log.info("%d cells labelled (%s) -> %s", len(df), mode, out)
    return df


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m morphomol.studies.cells.predict", description=__doc__.split("\n")[0])
    p.add_argument("--adapter", required=True, help="adapter directory written by cells_train")
    p.add_argument("--h5ad", required=True, help="AnnData with the new cells")
    p.add_argument("--out", required=True, help="output CSV")
    p.add_argument("--mode", default="score", choices=("score", "generate"))
    p.add_argument("--layer", default=None, help="layer with the values ('raw' = .raw.X); default X")
    p.add_argument("--label-key", default=None, help="obs column with known labels (adds label, correct)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    enforce_offline()  # no hub at run time (morphomol.util.offline), before transformers is imported
    setup_logging(None)
    try:
        predict_cells(h5ad=args.h5ad, adapter=args.adapter, out=args.out, mode=args.mode, layer=args.layer,
                      label_key=args.label_key, batch_size=args.batch_size, device=args.device)
    except MorphomolError as exc:
        log.error("%s", exc.message)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
