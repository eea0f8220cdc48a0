"""Cells cohorts without images run without their image tasks (logged), and a user's ``cells.tasks``
mapping is taken as given (the defaults' image tasks are not merged back into it)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import yaml

from morphomol.config import default_sections, load_config
from morphomol.studies.cells.examples import TaskSampler

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "config" / "experiments" / "cells.yaml"
TEXT_TASKS = {"gene_to_type": [[0, 1.0], [1, 2.0]], "type_to_genes": [[0, 1.0], [1, 0.5]]}


def _cohort(tmp_path, *, images: bool, **cells):
    (tmp_path / "labels.yaml").write_text("T cell: [T]\nB cell: [B]\n")
    rows = [(f"S{i}", f"P{i}", f"s{i}.h5ad") for i in range(4)]
    cols = "sample_id\tpatient_id\th5ad" + ("\timage_store" if images else "")
    lines = [cols]
    for sid, pid, h5 in rows:
        (tmp_path / h5).write_text("x")
        line = f"{sid}\t{pid}\t{h5}"
        if images:
            (tmp_path / f"{sid}.zarr").mkdir(exist_ok=True)
            line += f"\t{sid}.zarr"
        lines.append(line)
    (tmp_path / "samples.tsv").write_text("\n".join(lines) + "\n")
    base = {"label_map": "labels.yaml", "templates": str(TEMPLATES), "model": {"tiny": {}}, **cells}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"kind": "cells", "samples": "samples.tsv", "cells": base,
                                                     "splits": {"n_folds": 2}}))
    return load_config({"cohorts": {"c": "c.yaml"}}, config_file=tmp_path / "config.yaml", workdir=tmp_path)


def test_cohort_without_images_runs_without_its_image_tasks_by_default(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="morphomol"):
        pc = _cohort(tmp_path, images=False)  # default schedule: five tasks, three of them image tasks
    assert set(pc.cohorts["c"].cfg.cells.tasks) >= {"image_to_type"}
    msg = [r.getMessage() for r in caplog.records if "left out of the task schedule" in r.getMessage()]
    assert msg and "image_to_type" in msg[0] and "'c'" in msg[0]


def test_a_users_task_mapping_is_taken_as_given(tmp_path):
    pc = _cohort(tmp_path, images=True, tasks=TEXT_TASKS)
    tasks = pc.cohorts["c"].cfg.cells.tasks
    assert sorted(tasks) == ["gene_to_type", "type_to_genes"]  # the default image tasks are not merged back
    assert [list(map(float, k)) for k in tasks["gene_to_type"]] == TEXT_TASKS["gene_to_type"]
    cfg = default_sections(cells={"tasks": TEXT_TASKS}).cells  # the same rule for config mappings
    assert sorted(cfg.tasks) == ["gene_to_type", "type_to_genes"]


def test_fold_sampler_keeps_the_tasks_the_data_can_feed(caplog):
    cfg = default_sections().cells  # the default five tasks
    table = pd.DataFrame({"partition": ["fit"] * 4 + ["val", "test"], "has_image": False})
    with caplog.at_level(logging.INFO, logger="morphomol"):
        s = TaskSampler(table, cfg.tasks, {t: 1 for t in cfg.tasks}, seed=0, steps=10)
    assert s.tasks == ["gene_to_type", "type_to_genes"]
    assert {t for t, _, _ in s.draw(3, 64)} <= {"gene_to_type", "type_to_genes"}
    assert any("image_to_genes" in r.getMessage() and "left out" in r.getMessage() for r in caplog.records)
