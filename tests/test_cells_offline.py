"""No hub at run time: a cells training job (the real rule script through Snakemake, tiny local Gemma-3,
CPU) with the network unreachable and a user shell that says ``HF_HUB_OFFLINE=0`` logs no hub or hub-kernel
attempt (bitsandbytes used to ask ``kernels-community`` for a CPU kernel at import), and the offline
environment is what morphomol.util.offline promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from morphomol.config import default_sections
from morphomol.config.sections import to_plain
from morphomol.synthetic.cells_fixtures import toy_fold, toy_model
from morphomol.util.offline import ALLOW_ONLINE, OFFLINE_ENV, offline_environment

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "config" / "experiments" / "cells.yaml"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
HUB_MARKS = ("kernels-community", "Failed to load", "huggingface.co", "trust status", "get_kernel")

SNAKEFILE = """
import json
P = json.load(open("job.json"))

rule cells_train:
    input:
        fold_table=P["fold_table"],
        fold_meta=P["fold_meta"],
        templates=P["templates"],
    output:
        adapter=directory("run/adapter"),
        metrics="run/train_metrics.json",
        log_csv="run/train_log.csv",
    params:
        cells=P["cells"],
        base_model=P["base_model"],
        image_stores=P["image_stores"],
        seed=0,
    log:
        "logs/cells_train.log",
    threads: 1
    script:
        P["script"]
"""


def test_offline_environment_is_forced_unless_allowed_explicitly():
    env = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
    assert offline_environment(env) is True
    assert all(env[k] == v for k, v in OFFLINE_ENV.items())  # a stray "0" does not make jobs go online
    allowed = {ALLOW_ONLINE: "1", "HF_HUB_OFFLINE": "0"}
    assert offline_environment(allowed) is False and allowed["HF_HUB_OFFLINE"] == "0"


def test_cells_training_job_reaches_no_hub_with_the_network_unreachable(tmp_path):
    fold = toy_fold(tmp_path / "fold", n_per_class=8)
    model = toy_model(tmp_path / "model", fold["genes"], TEMPLATES)
    tasks = {"gene_to_type": [[0, 1.0]], "type_to_genes": [[0, 0.3]]}
    cells = default_sections(cells={"tasks": tasks, "model": {"tiny": {}}, "n_genes": 8,
                                    "train": {"steps": 2, "batch_size": 2, "gradient_checkpointing": False,
                                              "log_every": 1, "val_every": 2, "val_examples": 2}}).cells
    work = tmp_path / "job"
    work.mkdir()
    (work / "job.json").write_text(json.dumps({
        "fold_table": str(fold["table"]), "fold_meta": str(fold["meta"]), "templates": str(TEMPLATES),
        "cells": to_plain(cells), "base_model": str(model),
        "image_stores": {k: str(v) for k, v in fold["images"].items()},
        "script": str(REPO / "scripts" / "cells_train.py")}))
    (work / "Snakefile").write_text(SNAKEFILE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "MORPHOMOL_"))
           and k.lower() not in ("no_proxy", "https_proxy", "http_proxy", "all_proxy")}
    unreachable = "http://127.0.0.1:9"  # nothing listens on the discard port: every connection is refused
    env.update({"HTTPS_PROXY": unreachable, "HTTP_PROXY": unreachable, "ALL_PROXY": unreachable,
                "https_proxy": unreachable, "http_proxy": unreachable, "HF_HUB_OFFLINE": "0",
                "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    res = subprocess.run([SNAKEMAKE, "--cores", "1", "--snakefile", "Snakefile", "run/train_metrics.json"], cwd=work,
                         env=env, capture_output=True, text=True, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    log = (work / "logs" / "cells_train.log").read_text()
    assert "adapter written" in log  # the job ran to its end
    for mark in HUB_MARKS:
        assert mark not in out and mark not in log, f"{mark!r} in the job's output:\n{out}\n{log}"
