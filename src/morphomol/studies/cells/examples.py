"""Examples of the five tasks, the task-ratio sampler, and their encoding for Gemma-3.

An :class:`Example` is one (task, cell, paraphrase): the prompt text, the response text and, for image
tasks, the cell's H&E patch. :class:`TaskSampler` draws the examples of training step ``s`` on process
``r`` (micro-batch ``m``) from ``numpy.random.default_rng([seed, s, r, m])`` with the schedule's weights at
that step: a run resumed at step ``s`` draws exactly what the uninterrupted run would have.

Encoding (:func:`encode_prompts` + :func:`assemble`): the processor tokenizes the chat-formatted prompts
and expands each image placeholder into Gemma-3's image tokens (``token_type_ids`` 1 on them, always
emitted); responses are tokenized alone (no special tokens) and appended, so the loss covers exactly the
response tokens and ``<end_of_turn>``: prompt, image and padding positions are -100 in ``labels``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from morphomol.errors import InputError
from morphomol.studies.cells.base_model import Chat
from morphomol.studies.cells.config import IMAGE_TASKS
from morphomol.studies.cells.prompts import Template, available_tasks, enabled_tasks, render, task_weights
from morphomol.util.logs import get_logger

IGNORE = -100
log = get_logger("cells.examples")


@dataclass
class Example:
    task: str
    row: int            # row of the fold table
    prompt: str         # the filled model_input (before the chat layout)
    response: str       # the filled response
    label: str
    image: np.ndarray | None = None


class PatchSource:
    """Per-cell H&E patches: ``stores`` sample -> image store (zarr group with ``images``); whole chunks
    are read and kept in a small LRU cache."""

    def __init__(self, stores: Mapping[str, str | Path], cache_chunks: int = 16) -> None:
        self.stores = {s: Path(p) for s, p in stores.items()}
        self._arrays: dict[str, Any] = {}
        self._cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self.cache_chunks = cache_chunks

    def _array(self, sample: str) -> Any:
        import zarr

        if sample not in self._arrays:
            if sample not in self.stores:
                raise InputError(f"sample {sample} has no image store", field="images",
                                 expected="image tasks only for cells with an H&E patch")
            self._arrays[sample] = zarr.open_group(str(self.stores[sample]), mode="r")["images"]
        return self._arrays[sample]

    def get(self, sample: str, index: int) -> np.ndarray:
        arr = self._array(sample)
        c = int(arr.chunks[0])
        key = (sample, int(index) // c)
        block = self._cache.get(key)
        if block is None:
            block = np.asarray(arr[key[1] * c:(key[1] + 1) * c])
            self._cache[key] = block
            if len(self._cache) > self.cache_chunks:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return block[int(index) - key[1] * c]


class FoldExamples:
    """Builds examples from a fold table (``label, sentence, n_sentence_genes, has_image, sample_id, index``).
    ``sentences``: the sentences by row when the table was read without them (a
    :class:`~morphomol.studies.cells.folds.FoldSentences`, read by row group on demand)."""

    def __init__(self, table: pd.DataFrame, templates: Mapping[str, Sequence[Template]], *, organism: str,
                 image_placeholder: str, patches: PatchSource | None, sentences: Sequence[str] | None = None) -> None:
        self.t = table.reset_index(drop=True)
        self.templates = templates
        self.organism = organism
        self.image_placeholder = image_placeholder
        self.patches = patches
        if sentences is None:
            sentences = self.t["sentence"].astype(str).tolist()
        elif len(sentences) != len(self.t):
            raise InputError(f"{len(sentences)} sentences for {len(self.t)} cells", field="sentence",
                             expected="the sentences of this fold table")
        self._sent = sentences
        self._ng = self.t["n_sentence_genes"].to_numpy(int)
        self._lab = self.t["label"].astype(str).tolist()
        self._img = self.t["has_image"].to_numpy(bool)

    def example(self, row: int, task: str, template: int = 0) -> Example:
        row = int(row)
        image = None
        if task in IMAGE_TASKS:
            if not self._img[row] or self.patches is None:
                raise InputError(f"image task {task} requested for cell {self.t.at[row, 'tile_id']} without an H&E patch",
                                 field="cells.tasks", expected="image tasks only for cells with patches")
            image = self.patches.get(str(self.t.at[row, "sample_id"]), int(self.t.at[row, "index"]))
        tpl = self.templates[task][int(template) % len(self.templates[task])]
        kw = dict(cell_sentence=self._sent[row], cell_type=self._lab[row], num_genes=int(self._ng[row]),
                  organism=self.organism, image=self.image_placeholder)
        return Example(task, row, render(tpl.model_input, **kw), render(tpl.response, **kw), self._lab[row], image)


class TaskSampler:
    """Reproducible task-ratio sampling of training examples over the fit cells of a fold."""

    def __init__(self, table: pd.DataFrame, schedule: Mapping[str, Sequence[Sequence[float]]],
                 n_templates: Mapping[str, int], *, seed: int, steps: int) -> None:
        part = table["partition"].to_numpy()
        self.rows = np.flatnonzero(part == "fit")
        self.image_rows = np.flatnonzero((part == "fit") & table["has_image"].to_numpy(bool))
        self.schedule, self.n_templates, self.seed, self.steps = schedule, dict(n_templates), int(seed), int(steps)
        self.tasks = available_tasks(schedule, len(self.image_rows) > 0)
        if not self.tasks:
            raise InputError("no task can be trained on this fold", field="cells.tasks",
                             expected="a task without images (gene_to_type, type_to_genes) when no cell has an H&E patch")
        dropped = [t for t in enabled_tasks(schedule) if t not in self.tasks]
        if dropped:
            log.info("image task(s) %s left out of the task schedule: no fit cell of this fold has an H&E patch "
                     "(training on %s)", dropped, self.tasks)

    def weights(self, step: int) -> dict[str, float]:
        return task_weights(self.schedule, step / max(self.steps - 1, 1), self.tasks)

    def draw(self, step: int, n: int, *, rank: int = 0, micro: int = 0) -> list[tuple[str, int, int]]:
        """``n`` (task, row, template) triples of one micro-batch."""
        rng = np.random.default_rng([self.seed, int(step), int(rank), int(micro)])
        w = self.weights(step)
        names = list(w)
        picks = rng.choice(len(names), size=n, p=np.asarray([w[t] for t in names]))
        out = []
        for i in picks:
            task = names[int(i)]
            pool = self.image_rows if task in IMAGE_TASKS else self.rows
            out.append((task, int(pool[rng.integers(len(pool))]), int(rng.integers(self.n_templates[task]))))
        return out


def validation_set(table: pd.DataFrame, tasks: Sequence[str], n: int, seed: int) -> list[tuple[str, int, int]]:
    """Fixed validation examples: up to ``n`` val cells per task (image tasks: cells with a patch), template 0."""
    part = table["partition"].to_numpy()
    out = []
    for k, task in enumerate(tasks):
        pool = np.flatnonzero((part == "val") & (table["has_image"].to_numpy(bool) | (task not in IMAGE_TASKS)))
        if len(pool) == 0:
            continue
        rng = np.random.default_rng([int(seed), 99, k])
        out += [(task, int(r), 0) for r in np.sort(rng.choice(pool, min(n, len(pool)), replace=False))]
    return out


# ------------------------------------------------------------------------------ encoding
@dataclass
class Prompts:
    """Tokenized chat prompts: ids and token types per example, pixel values (C, H, W) or None."""

    ids: list[list[int]]
    token_types: list[list[int]]
    pixels: list[torch.Tensor | None]


def encode_prompts(processor: Any, chat: Chat, examples: Sequence[Example]) -> Prompts:
    texts = [chat.prompt(e.prompt) for e in examples]
    images = [[e.image] if e.image is not None else [] for e in examples]
    has = any(len(i) for i in images)
    enc = processor(text=texts, images=images if has else None, add_special_tokens=False)
    ids = [list(map(int, x)) for x in enc["input_ids"]]
    tt = enc.get("token_type_ids")
    tt = [list(map(int, x)) for x in tt] if tt is not None else [[int(t == chat.image_token_id) for t in x] for x in ids]
    pixels: list[torch.Tensor | None] = [None] * len(examples)
    if has:
        pv = iter(enc["pixel_values"])
        for i, im in enumerate(images):
            if im:
                pixels[i] = torch.as_tensor(np.asarray(next(pv)), dtype=torch.float32)
    return Prompts(ids, tt, pixels)


def tokenize_responses(tokenizer: Any, chat: Chat, texts: Sequence[str]) -> list[list[int]]:
    """Response token ids (no special tokens added) ending with ``<end_of_turn>``."""
    enc = tokenizer([chat.response(t) for t in texts], add_special_tokens=False)
    return [list(map(int, x)) for x in enc["input_ids"]]


def assemble(p: Prompts, rows: Sequence[int], responses: Sequence[Sequence[int]] | None, *, pad_id: int,
             max_length: int, left: bool = False) -> dict[str, Any]:
    """Batch tensors of prompts ``rows`` (+ their responses): ``input_ids, attention_mask, token_type_ids,
    labels`` (-100 outside responses), ``pixel_values`` (images in batch order) and ``response_mask``."""
    seqs, types, labs = [], [], []
    for j, r in enumerate(rows):
        resp = list(responses[j]) if responses is not None else []
        s = p.ids[r] + resp
        if len(s) > max_length:
            raise InputError(f"an example of {len(s)} tokens exceeds the maximum length {max_length}",
                             field="cells.train.max_length", expected="a larger max_length or fewer genes (n_genes)")
        seqs.append(s)
        types.append(p.token_types[r] + [0] * len(resp))
        labs.append([IGNORE] * len(p.ids[r]) + resp)
    width = max(len(s) for s in seqs)
    n = len(seqs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    att = torch.zeros((n, width), dtype=torch.long)
    tt = torch.zeros((n, width), dtype=torch.long)
    lab = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, (s, t, lb) in enumerate(zip(seqs, types, labs, strict=True)):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        att[i, sl] = 1
        tt[i, sl] = torch.tensor(t)
        lab[i, sl] = torch.tensor(lb)
    out: dict[str, Any] = {"input_ids": ids, "attention_mask": att, "token_type_ids": tt, "labels": lab}
    pix = [p.pixels[r] for r in rows if p.pixels[r] is not None]
    if pix:
        out["pixel_values"] = torch.stack(pix)
    return out


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed next-token cross-entropy over response tokens, and their token counts."""
    lg = logits[:, :-1].float()
    tg = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), ignore_index=IGNORE,
                                           reduction="none").view(tg.shape)
    mask = (tg != IGNORE)
    return (ce * mask).sum(1), mask.sum(1)
