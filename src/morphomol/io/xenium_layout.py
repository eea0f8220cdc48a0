"""The layout of a 10x Xenium output bundle: file names, control features, the gene panel.

Only small files are read here (``gene_panel.json``); no pyarrow, no transcripts. Used when Snakemake
builds the DAG (which files of a bundle a rule reads) and by the config checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from morphomol.errors import InputError
from morphomol.util.jsonio import read_json

CONTROL_PREFIXES: tuple[str, ...] = (
    "BLANK_",
    "NegControlCodeword_",
    "NegControlProbe_",
    "UnassignedCodeword_",
    "DeprecatedCodeword_",
    "Intergenic_Region_",
)
REQUIRED_COLUMNS: tuple[str, ...] = ("feature_name", "x_location", "y_location")
#: transcript tables in order of preference
TRANSCRIPT_FILES: tuple[str, ...] = ("transcripts.parquet", "transcripts.csv.gz", "transcripts.csv")
#: morphology (DAPI) images in order of preference
MORPHOLOGY_FILES: tuple[str, ...] = (
    "morphology_focus.ome.tif",
    "morphology_focus/ch0000_dapi.ome.tif",
    "morphology_focus/morphology_focus_0000.ome.tif",
    "morphology_mip.ome.tif",
)
CELLS_FILES: tuple[str, ...] = ("cells.parquet", "cells.csv.gz", "cells.csv")


def is_control(name: str) -> bool:
    """True when ``name`` is a control feature (by :data:`CONTROL_PREFIXES`)."""
    return name.startswith(CONTROL_PREFIXES)


def _normalise_name(value: Any) -> str:
    """Feature names may arrive as bytes, or as a Python bytes repr ("b'CD3E'") in CSVs
    that were converted from parquet without decoding."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", errors="replace")
    s = str(value)
    if len(s) >= 3 and s[0] == "b" and s[1] in "'\"" and s[-1] == s[1]:
        s = s[2:-1]
    return s


def read_gene_panel(bundle_dir: str | Path) -> list[str] | None:
    """Target gene names of ``<bundle>/gene_panel.json`` (controls excluded), or None if absent."""
    f = Path(bundle_dir) / "gene_panel.json"
    if not f.is_file():
        return None
    data = read_json(f, "gene_panel.json")
    payload = data.get("payload", data) if isinstance(data, dict) else {}
    targets = payload.get("targets") if isinstance(payload, dict) else None
    if not isinstance(targets, list):
        raise InputError("no target list", file=f, field="payload.targets", expected="a list of panel targets")
    genes: list[str] = []
    for t in targets:
        if not isinstance(t, dict):
            continue
        typ = t.get("type", {}) if isinstance(t.get("type"), dict) else {}
        dat = typ.get("data", {}) if isinstance(typ.get("data"), dict) else {}
        name = dat.get("name", t.get("name"))
        descriptor = str(typ.get("descriptor", "gene")).lower()
        if name is None or descriptor != "gene":
            continue
        name = _normalise_name(name)
        if not is_control(name) and name not in genes:
            genes.append(name)
    return genes


def bundle_files(bundle_dir: str | Path, *, morphology: bool = True) -> dict[str, Path]:
    """The files of a bundle the pipeline reads (experiment.xenium, the transcript table, the DAPI
    morphology image), found the way :class:`XeniumBundle` finds them, without opening them.

    Rules declare these as inputs so that rewriting a file inside a bundle reruns its dependants.
    Names absent on disk are left out (the rule that reads the bundle reports them).
    """
    d = Path(bundle_dir)
    out: dict[str, Path] = {}
    if (d / "experiment.xenium").is_file():
        out["experiment"] = d / "experiment.xenium"
    for name in TRANSCRIPT_FILES:
        if (d / name).is_file():
            out["transcripts"] = d / name
            break
    if morphology:
        for name in MORPHOLOGY_FILES:
            if (d / name).is_file():
                out["morphology"] = d / name
                break
    return out
