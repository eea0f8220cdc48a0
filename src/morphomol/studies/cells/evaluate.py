"""Cell type from expression (and H&E) with the LLM, in both decoding modes, on a fold's val / test cells.

* ``generate``: greedy free generation after the prompt (stops at ``<end_of_turn>`` / eos, at most
  ``max_new_tokens``), the text mapped back to a canonical label by the label map (exact label or alias,
  else the longest label it starts with); an answer naming no label is ``(unparsed)`` and wrong.
* ``score``: constrained decoding — the log-likelihood of every candidate label (its tokens and
  ``<end_of_turn>``) after the prompt, argmax over the fold's labels.

The same code evaluates the tuned model (base + adapter) and the untuned base model (the seed's naive
model). Tasks: gene -> type on every cell (validation and test); image -> type and image + genes -> type on
the test cells with an H&E patch (the modality matrix). Every method scores the same cells
(:func:`..folds.eval_subset`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from morphomol.studies.cells.base_model import Chat, load_adapter, load_base, load_processor
from morphomol.studies.cells.config import IMAGE_TASKS, TYPE_TASKS, CellsConfig
from morphomol.studies.cells.examples import (
    Example,
    FoldExamples,
    PatchSource,
    assemble,
    encode_prompts,
    token_losses,
    tokenize_responses,
)
from morphomol.studies.cells.folds import FoldSentences, eval_subset, read_fold
from morphomol.studies.cells.labels import LabelMap
from morphomol.studies.cells.metrics import PARTITIONS, UNPARSED, classification_metrics, results_table
from morphomol.studies.cells.prompts import enabled_tasks, load_templates
from morphomol.train.runtime import Runtime, run_context
from morphomol.util.atomic import atomic_path
from morphomol.util.jsonio import write_json
from morphomol.util.logs import get_logger

log = get_logger("cells.evaluate")


@dataclass
class EvalInputs:
    fold_table: Path
    fold_meta: Path
    base_model: Path
    templates: Path
    label_map: Path
    adapter: Path | None = None                      # None: the untuned base model
    image_stores: dict[str, Path] = field(default_factory=dict)


class Predictor:
    """A loaded model (base or base + adapter) that labels examples in both decoding modes."""

    def __init__(self, model: Any, processor: Any, chat: Chat, labels: Sequence[str], label_map: LabelMap,
                 device: torch.device, batch_size: int, max_new_tokens: int) -> None:
        self.model, self.processor, self.chat = model, processor, chat
        self.labels, self.lm, self.device = list(labels), label_map, device
        self.bs, self.max_new = int(batch_size), int(max_new_tokens)
        self.label_ids = tokenize_responses(processor.tokenizer, chat, self.labels)
        p = next((p for n, p in model.named_parameters() if "vision_tower" in n), None)
        self.pixel_dtype = p.dtype if p is not None and p.dtype.is_floating_point else torch.float32

    def _inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        kw = {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask", "token_type_ids")}
        if "pixel_values" in batch:
            kw["pixel_values"] = batch["pixel_values"].to(self.device, dtype=self.pixel_dtype)
        return kw

    @torch.no_grad()
    def score(self, examples: Sequence[Example]) -> tuple[list[str], np.ndarray]:
        """Argmax label and the (n, n_labels) log-likelihoods of every candidate label."""
        n_lab = len(self.labels)
        out = np.zeros((len(examples), n_lab))
        for i in range(0, len(examples), self.bs):
            chunk = examples[i:i + self.bs]
            p = encode_prompts(self.processor, self.chat, chunk)
            rows = [r for r in range(len(chunk)) for _ in range(n_lab)]
            batch = assemble(p, rows, self.label_ids * len(chunk), pad_id=self.chat.pad_id, max_length=10**9)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                logits = self.model(**self._inputs(batch), use_cache=False).logits
            sums, _ = token_losses(logits, batch["labels"].to(self.device))
            out[i:i + len(chunk)] = (-sums).view(len(chunk), n_lab).cpu().numpy()
        return [self.labels[j] for j in out.argmax(1)], out

    @torch.no_grad()
    def generate(self, examples: Sequence[Example]) -> tuple[list[str], list[str]]:
        """Parsed label (or ``(unparsed)``) and the raw text of greedy generation."""
        tok = self.processor.tokenizer
        texts: list[str] = []
        for i in range(0, len(examples), self.bs):
            chunk = examples[i:i + self.bs]
            p = encode_prompts(self.processor, self.chat, chunk)
            batch = assemble(p, list(range(len(chunk))), None, pad_id=self.chat.pad_id, max_length=10**9, left=True)
            width = batch["input_ids"].shape[1]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                gen = self.model.generate(**self._inputs(batch), max_new_tokens=self.max_new, do_sample=False,
                                          eos_token_id=list(self.chat.eos_ids), pad_token_id=self.chat.pad_id)
            for row in gen[:, width:].tolist():
                cut = next((k for k, t in enumerate(row) if t in self.chat.eos_ids), len(row))
                texts.append(tok.decode(row[:cut], skip_special_tokens=True).strip())
        parsed = [self.lm.parse(t) for t in texts]
        return [p if p is not None else UNPARSED for p in parsed], texts


def load_predictor(base_model: Path, adapter: Path | None, cfg: CellsConfig, labels: Sequence[str],
                   label_map: LabelMap, device: torch.device) -> Predictor:
    processor, chat = load_processor(base_model)
    model, _ = load_base(base_model, cfg, device)
    if adapter is not None:
        model = load_adapter(model, adapter)
    return Predictor(model, processor, chat, labels, label_map, device, cfg.eval.batch_size, cfg.eval.max_new_tokens)


def eval_tasks(cfg: CellsConfig, table: pd.DataFrame) -> list[str]:
    """Classification tasks evaluated: the enabled ones (image tasks only when some cells have a patch)."""
    on = enabled_tasks(cfg.tasks)
    has_img = bool(table["has_image"].any())
    return [t for t in TYPE_TASKS if t in on and (has_img or t not in IMAGE_TASKS)]


def evaluate_fold(inputs: EvalInputs, out_predictions: str | Path, out_metrics: str | Path, *, cfg: CellsConfig,
                  runtime: Runtime, model_name: str) -> dict[str, Any]:
    """Rule entry (``cells_eval``): predictions (``tile_id, partition, task, mode, label, pred, text``) and
    metrics per (partition, task, mode) of the tuned (``adapter``) or untuned model on one fold."""
    with run_context(runtime) as device:
        table, meta = read_fold(inputs.fold_table, inputs.fold_meta, columns=["n_sentence_genes"])
        sentences = FoldSentences(inputs.fold_table)  # read by row group on demand, not the cohort's text at once
        lm = LabelMap.read(inputs.label_map)
        tasks = eval_tasks(cfg, table)
        templates = load_templates(inputs.templates, tasks)
        pred = load_predictor(inputs.base_model, inputs.adapter, cfg, meta["labels"], lm, device)
        patches = PatchSource(inputs.image_stores) if inputs.image_stores else None
        fx = FoldExamples(table, templates, organism=cfg.organism, image_placeholder=pred.chat.image, patches=patches,
                          sentences=sentences)
        rows, timing = [], {m: [0.0, 0] for m in cfg.eval.modes}
        for part in PARTITIONS:
            cells = eval_subset(table, part, cfg.eval.max_cells, runtime.seed)
            # validation: the seed's table (gene -> type); the modality matrix is reported on the test cells
            for task in tasks if part == "test" else [t for t in tasks if t == "gene_to_type"]:
                sel = cells[cells["has_image"]] if task in IMAGE_TASKS else cells
                if sel.empty:
                    continue
                exs = [fx.example(int(r), task, 0) for r in sel.index]
                for mode in cfg.eval.modes:
                    t0 = time.perf_counter()
                    if mode == "score":
                        labels, ll = pred.score(exs)
                        texts = [""] * len(exs)
                        margin = np.sort(ll, 1)[:, -1] - (np.sort(ll, 1)[:, -2] if ll.shape[1] > 1 else 0)
                    else:
                        labels, texts = pred.generate(exs)
                        margin = np.full(len(exs), np.nan)
                    timing[mode][0] += time.perf_counter() - t0
                    timing[mode][1] += len(exs)
                    rows.append(pd.DataFrame({
                        "tile_id": sel["tile_id"].to_numpy(), "sample_id": sel["sample_id"].to_numpy(),
                        "patient_id": sel["patient_id"].to_numpy(), "has_image": sel["has_image"].to_numpy(bool),
                        "partition": part, "task": task, "mode": mode, "label": sel["label"].to_numpy(),
                        "pred": labels, "text": texts, "margin": margin}))
                    m = classification_metrics(sel["label"].tolist(), labels)
                    log.info("%s fold %s %s %s %s: accuracy %.3f macro-F1 %.3f (n=%d, unparsed %.2f)", model_name,
                             meta["fold"], part, task, mode, m["accuracy"], m["macro_f1"], m["n"], m["unparsed"])
        preds = pd.concat(rows, ignore_index=True)
        metrics = {"model": model_name, "fold": meta["fold"], "adapter": str(inputs.adapter) if inputs.adapter else None,
                   "labels": meta["labels"], "results": results_table(preds),
                   "cells_per_second": {m: (n / s if s > 0 else None) for m, (s, n) in timing.items()}}
        with atomic_path(out_predictions) as tmp:
            preds.to_parquet(tmp, index=False)
        write_json(out_metrics, metrics)
        return metrics
