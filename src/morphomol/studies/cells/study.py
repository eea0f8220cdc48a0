"""The cells study's registry entry, its cohort kind and its pre-flight checks (torch-free).

Cohort kind ``cells``: a sample sheet whose rows are AnnData cell tables (``h5ad``) or Xenium bundles
(``xenium_dir`` + the Xenium Explorer cell-groups CSV ``labels``), optionally with an H&E slide and the
fusion study's registration inputs (Xenium rows) or a row-aligned image store (h5ad rows).

Everything checkable before any job runs fails in ``morphomol check-config`` / ``snakemake -n``: the
label map, the prompt templates and the task schedule, the base-model directory (or the tiny-model
option), each sheet row's combination of columns, image tasks without any image source, folds vs donors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from morphomol.config.kinds import CohortKind, register_kind
from morphomol.errors import InputError
from morphomol.studies import StudySpec, register_study

KIND = register_kind(CohortKind(
    name="cells",
    description="cell tables (AnnData .h5ad or Xenium cells + cell groups), optionally with H&E (cells study)",
    required=("sample_id", "patient_id"),
    columns=("sample_id", "patient_id", "h5ad", "xenium_dir", "labels", "image_store", "he_path", "he_mpp",
             "alignment", "regions"),
    path_columns=("h5ad", "xenium_dir", "labels", "image_store", "he_path", "alignment", "regions"),
    dir_columns=("xenium_dir", "image_store"),
    numeric_columns=("he_mpp",),
    studies=("cells",),
))


def row_source(row: dict[str, Any]) -> str:
    """``h5ad`` or ``xenium`` (the sheet check guarantees exactly one)."""
    return "h5ad" if row.get("h5ad") else "xenium"


def row_has_image(row: dict[str, Any]) -> bool:
    return bool(row.get("he_path") or row.get("image_store"))


def check_rows(cohort: Any) -> None:
    """Each row names exactly one source and only the columns that go with it."""
    sheet = cohort.sheet_path
    for i, sid in enumerate(cohort.sample_ids):
        row = cohort.sample(sid)
        where = f"row {i + 2} (sample {sid})"
        has = {c for c, v in row.items() if v is not None}
        if ("h5ad" in has) == ("xenium_dir" in has):
            raise InputError(f"{where}: name exactly one of h5ad / xenium_dir", file=sheet, field="h5ad",
                             expected="an AnnData cell table or a Xenium bundle per row")
        if "xenium_dir" in has:
            if "labels" not in has:
                raise InputError(f"{where}: a Xenium row needs its cell-groups CSV", file=sheet, field="labels",
                                 expected="the Xenium Explorer export (cell_id, group)")
            if "image_store" in has:
                raise InputError(f"{where}: image_store goes with h5ad rows", file=sheet, field="image_store",
                                 expected="he_path (+ alignment) for a Xenium row")
        else:
            for col in ("labels", "he_path"):
                if col in has:
                    raise InputError(f"{where}: {col} goes with Xenium rows (h5ad rows carry labels in obs and "
                                     "patches in image_store)", file=sheet, field=col)
        for col in ("he_mpp", "alignment", "regions"):
            if col in has and "he_path" not in has:
                raise InputError(f"{where}: {col} without he_path", file=sheet, field=col)


def check(cohort: Any, *, workdir: Path, config_file: Path) -> None:
    from morphomol.studies.cells.labels import LabelMap
    from morphomol.studies.cells.modelfiles import check_model_dir
    from morphomol.studies.cells.prompts import check_schedule, enabled_tasks, load_templates

    c = cohort.cfg.cells
    src = cohort.source_of("cells") or config_file
    if not c.label_map:
        raise InputError("no label map", file=src, field="cells.label_map",
                         expected="a YAML mapping canonical cell types to the label strings of the data")
    LabelMap.read(workdir / c.label_map)
    check_schedule(c.tasks, file=src)
    tasks = enabled_tasks(c.tasks)
    load_templates(workdir / c.templates, tasks)
    if (c.model.path is None) == (c.model.tiny is None):
        raise InputError("name exactly one of model.path / model.tiny", file=src, field="cells.model",
                         expected="a local base-model directory (MedGemma-4b-it), or tiny: {...} for a demo model")
    if c.model.path is not None:
        check_model_dir(workdir / c.model.path, file=src)
    if c.model.tiny is not None:
        t = c.model.tiny
        side = t.image_size // t.patch_size
        root = round(t.mm_tokens ** 0.5)
        if t.image_size % t.patch_size or root * root != t.mm_tokens or side % root:
            raise InputError(f"tiny vision geometry image_size {t.image_size}, patch_size {t.patch_size}, mm_tokens "
                             f"{t.mm_tokens}", file=src, field="cells.model.tiny",
                             expected="patch_size dividing image_size, mm_tokens a square whose root divides the "
                                      "patch grid")
    check_rows(cohort)
    images = [s for s in cohort.sample_ids if row_has_image(cohort.sample(s))]
    image_tasks = [t for t in tasks if t in c.image_tasks]
    if image_tasks and not images:
        raise InputError(f"image task(s) {image_tasks} enabled but no sample has an H&E (he_path) or image_store",
                         file=src, field="cells.tasks",
                         expected="image tasks only for cohorts with patches (set their weights to [[0, 0]])")
    if c.donor_key is None:
        n_donors = cohort.samples["patient_id"].nunique()
        if n_donors < cohort.cfg.splits.n_folds + 1:
            raise InputError(f"cohort '{cohort.name}' has {n_donors} donor(s) for {cohort.cfg.splits.n_folds} folds",
                             file=cohort.source_of("splits") or config_file, field="splits.n_folds",
                             expected=f"at most {n_donors - 1} folds (test and validation donors are disjoint)")


STUDY = register_study(StudySpec(
    name="cells",
    description="QLoRA-tuned multimodal LLM for cell types from expression and H&E (seed 000)",
    cohort_kinds=("cells",),
    check=check,
    settings_schema="settings.cells.schema.yaml",
))
