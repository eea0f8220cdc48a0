"""The cells study's registry entry, its cohort kind and its pre-flight checks (torch-free).

Cohort kind ``cells``: a sample sheet whose rows are AnnData cell tables (``h5ad``) or Xenium bundles
(``xenium_dir`` + the Xenium Explorer cell-groups CSV ``labels``), optionally with an H&E slide and the
fusion study's registration inputs (Xenium rows) or a row-aligned image store (h5ad rows).

Everything checkable before any job runs fails in ``morphomol check-config`` / ``snakemake -n``: the
label map, the prompt templates and the task schedule (a cohort without any image source runs without its
image tasks, logged), the base-model directory (or the tiny-model option), each sheet row's combination of
columns, the fold plan over donors (the shared policy of :mod:`morphomol.splits`; donors from the h5ad obs column when cells.donor_key is set).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from morphomol.config.kinds import CohortKind, register_kind
from morphomol.errors import InputError
from morphomol.studies import StudySpec, StudySummary, log_noop, register_study
from morphomol.util.logs import get_logger

log = get_logger("cells.study")

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


def check(cohort: Any, *, workdir: Path, config_file: Path, preflight: bool = True) -> None:
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
    if not any(row_has_image(cohort.sample(s)) for s in cohort.sample_ids):
        tasks = [t for t in tasks if t not in c.image_tasks] or tasks  # only what the data can feed (below)
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
    image_tasks = [t for t in enabled_tasks(c.tasks) if t in c.image_tasks]
    if image_tasks and not images:
        # a cohort without H&E runs without its image tasks: the schedule keeps the tasks the data can feed
        # (each fold's sampler and evaluation drop image tasks when no cell has a patch, and log it)
        text_tasks = [t for t in enabled_tasks(c.tasks) if t not in image_tasks]
        if not text_tasks:
            raise InputError(f"only image task(s) {image_tasks} enabled but no sample has an H&E (he_path) or "
                             "image_store", file=src, field="cells.tasks",
                             expected="a task without images (gene_to_type, type_to_genes) for a cohort without H&E")
        log.info("cohort '%s': no sample has an H&E (he_path) or image_store; the image task(s) %s are left out "
                 "of the task schedule (training and evaluation: %s)", cohort.name, image_tasks, text_tasks)
    groups = donor_groups(cohort, workdir=workdir) if preflight else None
    if groups is not None:
        from morphomol.splits import check_fold_plan

        check_fold_plan(cohort, file=cohort.source_of("splits") or config_file, groups=groups, unit="donor")
    if preflight:
        log_noop(summary(cohort, workdir=workdir))


def summary(cohort: Any, *, workdir: Path) -> StudySummary:
    """``cells: base model <dir> (gemma3)`` or ``cells: tiny random demo model``. No base model stops the check
    above (naming cells.model.path); a real cohort on the tiny random model gets a warning."""
    import json

    from morphomol.studies.cells.prompts import enabled_tasks

    c = cohort.cfg.cells
    tasks = ", ".join(enabled_tasks(c.tasks))
    warnings = []
    if c.model.path is not None:
        try:
            kind = json.loads((workdir / c.model.path / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            kind = None
        line = f"cells: base model {c.model.path}" + (f" ({kind})" if kind else "") + f"; tasks {tasks}"
    else:
        line = f"cells: tiny random demo model (cells.model.tiny); tasks {tasks}"
        if cohort.simulate is None:
            warnings.append(f"cohort '{cohort.name}': cells.model.tiny builds a small randomly initialised model: "
                            "the LLM rows of the cells tables mean nothing for real data; set cells.model.path to a "
                            "local base-model directory (e.g. MedGemma-4b-it) instead of cells.model.tiny")
    return StudySummary(line, tuple(warnings))


def donor_groups(cohort: Any, *, workdir: Path) -> dict[str, list[str]] | None:
    """donor -> its (donor, sample) groups, the units of the shared fold policy (:mod:`morphomol.splits`):
    the sheet's patient_id, or with ``cells.donor_key`` the h5ad rows' obs column (only that column is read);
    None while an h5ad input does not exist yet (a simulated demo; the cells_split rule plans then)."""
    from morphomol.studies.cells.folds import SEP

    key = cohort.cfg.cells.donor_key
    groups: dict[str, list[str]] = {}
    for sid in cohort.sample_ids:
        row = cohort.sample(sid)
        donors: list[str] = [str(row["patient_id"])]
        if key is not None and row.get("h5ad"):
            path = workdir / row["h5ad"]
            if not path.is_file():
                return None
            donors = obs_values(path, key)
        for d in dict.fromkeys(donors):
            groups.setdefault(d, []).append(f"{d}{SEP}{sid}")
    return groups


def obs_values(path: Path, key: str) -> list[str]:
    """The distinct values of one obs column of an h5ad file (nothing else is read)."""
    import h5py
    from anndata.io import read_elem

    try:
        with h5py.File(path, "r") as f:
            if key not in f["obs"]:
                raise InputError(f"no donor column {key!r} in obs", file=path, field=f"obs/{key}",
                                 expected="the donor column named by cells.donor_key")
            col = read_elem(f["obs"][key])
    except OSError as exc:
        raise InputError(f"cannot read the AnnData file ({exc})", file=path, expected="an h5ad file") from None
    return sorted({str(v) for v in col})


STUDY = register_study(StudySpec(
    name="cells",
    description="QLoRA-tuned multimodal LLM for cell types from expression and H&E (seed 000)",
    cohort_kinds=("cells",),
    check=check,
    settings_schema="settings.cells.schema.yaml",
    summary=summary,
))
