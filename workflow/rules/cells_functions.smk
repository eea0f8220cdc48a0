# Helper functions of cells.smk (kept apart from the rules, as Snakemake's linter asks). Torch-free.

from morphomol.studies.cells.modelfiles import model_files
from morphomol.studies.cells.study import row_source

CELLS = "cells"
#: files of a Xenium bundle the cells rules read (the simulator writes exactly these)
CELLS_XENIUM = {
    "matrix": "cell_feature_matrix.h5",
    "cells": "cells.parquet",
    "transcripts": "transcripts.parquet",
    "experiment": "experiment.xenium",
}


def _cells_regex(pred):
    names = sorted(re.escape(c) for c, co in COHORTS.items() if co.kind.name == CELLS and pred(co))
    return "|".join(names) if names else "(?!)"


CELLS_SIMULATED = _cells_regex(lambda co: co.simulate is not None)
CELLS_TINY = _cells_regex(lambda co: co.cfg.cells.model.tiny is not None)


def cells_row(w):
    return cohort_of(w).sample(w.sample)


def cells_xenium_files(w, *names):
    """Files read from the sample's Xenium directory; for real bundles, those present on disk."""
    d = Path(cells_row(w)["xenium_dir"])
    out = {}
    for n in names:
        f = d / CELLS_XENIUM[n]
        if cohort_of(w).simulate is not None or f.exists():
            out[n] = str(f)
    if cohort_of(w).simulate is None and "transcripts" in names and "transcripts" not in out:
        found = bundle_files(d, morphology=False)
        if "transcripts" in found:
            out["transcripts"] = str(found["transcripts"])
    if cohort_of(w).simulate is None and "cells" in names and "cells" not in out:
        for name in ("cells.csv.gz", "cells.csv"):  # older exports (the reader takes the first present)
            if (d / name).exists():
                out["cells"] = str(d / name)
                break
    return out


def cells_register_inputs(w):
    files = cells_xenium_files(w, "experiment", "transcripts")
    if cohort_of(w).simulate is None:
        found = bundle_files(Path(cells_row(w)["xenium_dir"]), morphology=True)
        if "morphology" in found:
            files["morphology"] = str(found["morphology"])
    files["he"] = sample_field("he_path")(w)
    for col in ("alignment", "regions"):
        value = sample_field(col)(w)
        if value:
            files[col] = value
    return files


def cells_units_inputs(w):
    """What a sample's unit table is built from: the h5ad (+ image store) or the Xenium cell matrix,
    centroids and groups (+ H&E and its registration); the label map."""
    row = cells_row(w)
    inputs = {"label_map": cfg_of(w).cells.label_map}
    if row_source(row) == "h5ad":
        inputs["h5ad"] = row["h5ad"]
        if row.get("image_store"):
            inputs["image_store"] = row["image_store"]
    else:
        inputs.update(cells_xenium_files(w, "matrix", "cells"))
        inputs["labels"] = row["labels"]
        if row.get("he_path"):
            inputs["he"] = row["he_path"]
            inputs["registration"] = P.registration(w.cohort, w.sample)
    return inputs


def cells_units(cohort):
    return [P.units(cohort, s) for s in samples_of(cohort)]


def cells_image_stores(cohort):
    """sample -> image store of the samples with patches (an H&E: images.zarr; an h5ad row: its store)."""
    c = cohort_of(cohort)
    out = {}
    for s in samples_of(cohort):
        if c.field(s, "he_path"):
            out[s] = P.image_store(cohort, s)
        elif c.field(s, "image_store"):
            out[s] = c.field(s, "image_store")
    return out


def cells_base_model_dir(cohort):
    c = cfg_of(cohort).cells
    return P.cells_base_model(cohort) if c.model.tiny is not None else c.model.path


def cells_model_inputs(w):
    """A training / evaluation job reads the fold, the base model (its files), the templates, the label
    map and the image stores of the samples with patches."""
    c = cfg_of(w).cells
    inputs = {"fold_table": P.cells_fold("parquet", w.cohort, w.fold), "fold_meta": P.cells_fold("json", w.cohort, w.fold),
              "templates": c.templates, "label_map": c.label_map,
              "base_model": P.cells_base_model(w.cohort) if c.model.tiny is not None else model_files(c.model.path)}
    stores = cells_image_stores(w.cohort)
    if stores:
        inputs["images"] = list(stores.values())
    return inputs


def cells_eval_inputs(w):
    """The tuned model's evaluation also reads its adapter."""
    inputs = cells_model_inputs(w)
    if w.setting == "llm":
        inputs["adapter"] = P.run(CELLS, "adapter", w.cohort, "llm", w.fold)
    return inputs


def cells_models(cohort):
    """Run names of a cohort: the tuned LLM, the untuned base model (unless disabled), the baselines."""
    return ["llm"] + (["untuned"] if cfg_of(cohort).cells.eval.untuned else []) + ["baselines"]


def cells_run_files(cohort, name):
    return {m: [P.run(CELLS, name, cohort, m, k) for k in folds_of(cohort)] for m in cells_models(cohort)}


CELLS_TABLES = ("table_cells.csv", "table_cells.md", "table_cells.tex", "ladder.csv", "ladder.md", "ladder.tex",
                "modality.csv", "modality.md", "modality.tex", "per_class.csv", "confusion.csv", "summary.json",
                "run_metadata.json")


def cells_targets(cohort):
    out = [P.units(cohort, s) for s in samples_of(cohort)]
    out += [P.table(CELLS, n, cohort) for n in ("table_cells.md", "ladder.md", "modality.md", "summary.json", "plots")]
    return out


STUDY_TARGETS[CELLS] = cells_targets
