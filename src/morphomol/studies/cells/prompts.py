"""Prompt templates and the task-ratio schedule of the cells study (torch-free).

Templates (``config/experiments/cells.yaml``, schema ``settings.cells.schema.yaml``) follow the
Cell2Sentence layout: per task a list of paraphrases with ``model_input`` / ``response`` and the
placeholders {num_genes}, {organism}, {cell_sentence}, {cell_type}, {image}. Each task needs its own
placeholders (:data:`REQUIRED`), checked with the file and task named.

The schedule (config ``cells.tasks``): per task knots ``[[progress, weight], ...]`` interpolated linearly
over training progress (0 = first step, 1 = last), constant beyond the first / last knot; a task whose
weights are all zero is disabled. :func:`task_weights` normalises over the tasks available in a fold
(image tasks need units with an H&E patch). Sampling is reproducible: example ``i`` of step ``s`` on
process ``r`` draws from ``numpy.random.default_rng([seed, s, r])``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from morphomol.errors import InputError
from morphomol.studies.cells.config import IMAGE_TASKS, TASKS

PLACEHOLDERS = ("num_genes", "organism", "cell_sentence", "cell_type", "image")
#: task -> (placeholders the model_input must hold, placeholders the response must hold)
REQUIRED: dict[str, tuple[set[str], set[str]]] = {
    "gene_to_type": ({"cell_sentence"}, {"cell_type"}),
    "type_to_genes": ({"cell_type"}, {"cell_sentence"}),
    "image_to_genes": ({"image"}, {"cell_sentence"}),
    "image_to_type": ({"image"}, {"cell_type"}),
    "image_genes_to_type": ({"image", "cell_sentence"}, {"cell_type"}),
}
#: placeholders a task must NOT use (they would leak the answer or need a missing modality)
FORBIDDEN: dict[str, set[str]] = {
    "gene_to_type": {"image", "cell_type"},
    "type_to_genes": {"image", "cell_sentence"},
    "image_to_genes": {"cell_sentence", "cell_type"},
    "image_to_type": {"cell_sentence", "cell_type"},
    "image_genes_to_type": {"cell_type"},
}


@dataclass(frozen=True)
class Template:
    model_input: str
    response: str


def _fields(text: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}


def load_templates(path: str | Path, tasks: Sequence[str] = TASKS) -> dict[str, list[Template]]:
    """Paraphrases per task of ``tasks``; InputError for a schema violation, a task without templates,
    a missing / unknown / forbidden placeholder."""
    from morphomol.config.schema import read_yaml, validate

    path = Path(path)
    data = read_yaml(path, "cells prompt templates")
    validate(data, "settings.cells.schema.yaml", path, set_defaults=False)
    out: dict[str, list[Template]] = {}
    for task in tasks:
        items = data["templates"].get(task)
        if not items:
            raise InputError(f"no templates for task {task!r}", file=path, field=f"templates.{task}",
                             expected="at least one model_input / response pair (or disable the task in cells.tasks)")
        need_in, need_out = REQUIRED[task]
        for i, item in enumerate(items):
            where = f"templates.{task}[{i}]"
            try:
                f_in, f_out = _fields(item["model_input"]), _fields(item["response"])
            except ValueError as exc:
                raise InputError(f"malformed placeholder ({exc})", file=path, field=where) from None
            unknown = sorted((f_in | f_out) - set(PLACEHOLDERS))
            if unknown:
                raise InputError(f"unknown placeholder(s) {unknown}", file=path, field=where,
                                 expected="{" + "}, {".join(PLACEHOLDERS) + "}")
            if not need_in <= f_in or not need_out <= f_out:
                raise InputError(f"missing placeholder(s): model_input needs {sorted(need_in)}, response needs "
                                 f"{sorted(need_out)}", file=path, field=where)
            bad = sorted(FORBIDDEN[task] & f_in) + sorted({"image"} & f_out)
            if bad:
                raise InputError(f"placeholder(s) {bad} not allowed in this task's model_input", file=path, field=where)
            out.setdefault(task, []).append(Template(item["model_input"], item["response"]))
    return out


def render(text: str, *, cell_sentence: str = "", cell_type: str = "", num_genes: int = 0, organism: str = "",
           image: str = "") -> str:
    """Fill a template; runs of whitespace collapse to one space (an absent image leaves no gap)."""
    out = text.format(cell_sentence=cell_sentence, cell_type=cell_type, num_genes=num_genes, organism=organism,
                      image=image)
    return re.sub(r"[ \t]+", " ", out).strip()


# ------------------------------------------------------------------------------ schedule
def enabled_tasks(schedule: Mapping[str, Sequence[Sequence[float]]]) -> list[str]:
    """Tasks of the schedule with a non-zero weight somewhere, in the canonical task order."""
    return [t for t in TASKS if t in schedule and any(float(w) > 0 for _, w in schedule[t])]


def check_schedule(schedule: Mapping[str, Sequence[Sequence[float]]], *, file: str | Path | None = None) -> None:
    """InputError for knots outside progress 0..1, unsorted knots, or no enabled task."""
    for task, knots in schedule.items():
        ps = [float(p) for p, _ in knots]
        if any(p < 0 or p > 1 for p in ps) or ps != sorted(ps):
            raise InputError(f"knots {list(map(list, knots))} of task {task}", file=file, field=f"cells.tasks.{task}",
                             expected="[[progress, weight], ...] with progress in 0..1, increasing")
    if not enabled_tasks(schedule):
        raise InputError("every task has weight 0", file=file, field="cells.tasks", expected="at least one enabled task")


def weight_at(knots: Sequence[Sequence[float]], progress: float) -> float:
    ps = np.asarray([float(p) for p, _ in knots])
    ws = np.asarray([float(w) for _, w in knots])
    return float(np.interp(progress, ps, ws))


def task_weights(schedule: Mapping[str, Sequence[Sequence[float]]], progress: float,
                 available: Sequence[str]) -> dict[str, float]:
    """Normalised sampling weights of the ``available`` enabled tasks at ``progress`` (0..1)."""
    raw = {t: weight_at(schedule[t], progress) for t in enabled_tasks(schedule) if t in available}
    total = sum(raw.values())
    if total <= 0:
        raise InputError(f"no task has a positive weight at progress {progress:.3f} among {list(available)}",
                         field="cells.tasks", expected="a positive weight for some available task at every step")
    return {t: w / total for t, w in raw.items()}


def available_tasks(schedule: Mapping[str, Sequence[Sequence[float]]], has_images: bool) -> list[str]:
    """Enabled tasks a fold can train: image tasks only when some of its fit units have a patch."""
    return [t for t in enabled_tasks(schedule) if has_images or t not in IMAGE_TASKS]
