"""``morphomol init DIR``: a sample sheet and a cohort YAML from a folder of Xenium bundles / Space Ranger outs.

The folder is scanned (``max_depth`` levels) for

* Xenium bundles (a directory with ``experiment.xenium``) -> a xenium cohort ``NAME``: ``sample_id`` =
  the bundle's ``region_name`` (else its directory name, or the parent's for generic names such as
  ``xenium`` / ``outs``), the H&E (``*he_image.ome.tif`` inside or next to the bundle, else one H&E-like
  image next to it: ``he.tif``, ``*_he.tif``, ``*.svs`` ...), ``he_mpp`` from the image's metadata, the
  alignment (a Xenium Explorer keypoints CSV preferred over a 3x3 ``*he_imagealignment.csv``, told apart
  by content), regions (a GeoJSON or an Explorer selection CSV), and a ``panel.yaml`` (``mode: hvg``, the
  genes every bundle's ``gene_panel.json`` lists in a comment, to split into core / add-on);
* Space Ranger ``outs/`` (``filtered_feature_bc_matrix.h5`` + ``spatial/``) -> a visium cohort
  ``NAME`` (``NAME_visium`` when the folder also holds Xenium bundles; spots study): ``format: spaceranger``, the full-resolution H&E next to ``outs/`` when
  there is one (else the hires PNG with ``image_scale: hires``, marked), captions CSVs.

``patient_id`` comes from ``--patient-regex`` (its first group, searched in the run name, region name
and path of each sample) or a ``--patients`` TSV (``sample_id``, ``patient_id``); otherwise it is left
empty. Whatever could not be inferred is left empty and listed once, in ``# TODO`` lines at the top of
the sheet (the YAML's header points to them; ``morphomol init`` prints them once, after its log lines), so
``morphomol check-config`` stops on it until it is filled in. Paths are written
relative to ``relative_to`` (the working directory of the pipeline). Nothing is overwritten without
``overwrite``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from morphomol.errors import InputError
from morphomol.util.logs import get_logger

log = get_logger("init")

NAME_RE = re.compile(r"[^A-Za-z0-9_.-]+")
GENERIC = {"xenium", "outs", "output", "out", "bundle", "data"}
HE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".jpg", ".jpeg", ".png")
XENIUM_COLUMNS = ("sample_id", "patient_id", "xenium_dir", "he_path", "he_mpp", "alignment", "regions")
VISIUM_COLUMNS = ("sample_id", "patient_id", "format", "spaceranger_dir", "he_path", "he_mpp", "image_scale", "captions")


@dataclass
class Row:
    values: dict[str, Any]
    todo: list[str] = field(default_factory=list)


def _name(text: str) -> str:
    n = NAME_RE.sub("_", str(text)).strip("_.")
    return n if n and not n.startswith(".") else "sample"


def _rel(p: Path, base: Path) -> str:
    """``p`` relative to ``base`` (symlinks kept as they are), absolute when it lies outside ``base``."""
    rel = os.path.relpath(os.path.abspath(p), os.path.abspath(base))
    return os.path.abspath(p) if rel.startswith("..") else rel


def find_inputs(root: Path, max_depth: int = 4) -> tuple[list[Path], list[Path]]:
    """(Xenium bundle dirs, Space Ranger outs dirs) under ``root``, sorted."""
    xen, sr = [], []

    def walk(d: Path, depth: int) -> None:
        if (d / "experiment.xenium").is_file():
            xen.append(d)
            return
        if (d / "filtered_feature_bc_matrix.h5").is_file() and (d / "spatial").is_dir():
            sr.append(d)
            return
        if depth >= max_depth:
            return
        for c in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            walk(c, depth + 1)

    if not root.is_dir():
        raise InputError("not a directory", file=root, expected="a folder of Xenium bundles / Space Ranger outs")
    walk(root, 0)
    return xen, sr


def _sample_name(d: Path, meta: dict[str, Any]) -> str:
    if meta.get("region_name"):
        return _name(meta["region_name"])
    return _name(d.parent.name if d.name.lower() in GENERIC else d.name)


def _files_near(bundle: Path, shared_parent: bool) -> list[Path]:
    places = [bundle] + ([] if shared_parent else [bundle.parent])
    out = []
    for d in places:
        out += sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
    return out


def _he_candidates(files: list[Path]) -> list[Path]:
    bad = ("morphology", "dapi", "mask", "label", "thumbnail", "tissue_lowres", "tissue_hires", "aligned_fiducials",
           "detected_tissue")
    out = []
    for p in files:
        low = p.name.lower()
        if low.endswith(HE_SUFFIXES) and not any(b in low for b in bad):
            if re.search(r"(^|[_.-])(he|h&e|hne|hande|he_image)([_.-]|$)", low) or low.endswith((".svs", ".ndpi", ".mrxs")):
                out.append(p)
    return out


def _he_mpp(path: Path) -> float | None:
    from morphomol.io.he import open_slide

    try:
        s = open_slide(path)
    except InputError:
        return None
    try:
        return s.meta_mpp
    finally:
        s.close()


def _is_geojson(p: Path) -> bool:
    """A (small) GeoJSON of polygons: FeatureCollection / Feature / (Multi)Polygon at the top level."""
    if p.stat().st_size > 50_000_000:
        return False
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    if isinstance(doc, list):
        return bool(doc) and all(isinstance(f, dict) and f.get("type") == "Feature" for f in doc)
    return isinstance(doc, dict) and doc.get("type") in ("FeatureCollection", "Feature", "Polygon", "MultiPolygon")


def compile_patient_regex(pattern: str | None) -> re.Pattern[str] | None:
    """``--patient-regex`` compiled, or one InputError naming the flag."""
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise InputError(f"{pattern!r} is not a valid regular expression ({exc})", field="--patient-regex",
                         expected="a Python regex whose first group is the patient id, e.g. 'P(\\d+)'") from None


def _patient(texts: list[str], regex: re.Pattern[str] | None, table: dict[str, str], sample: str) -> str | None:
    if sample in table:
        return table[sample]
    if regex is not None:
        for t in texts:
            m = regex.search(t)
            if m:
                found = m.group(1) if m.groups() else m.group(0)
                if found:  # an optional group that did not take part is no patient id
                    return _name(found)
    return None


def xenium_row(bundle: Path, *, shared_parent: bool, base: Path, regex: re.Pattern[str] | None,
               patients: dict[str, str]) -> Row:
    """The sheet row of one Xenium bundle (module docstring)."""
    from morphomol.io.discover import find_he_files
    from morphomol.io.landmarks import detect_alignment_format
    from morphomol.io.regions import detect_regions_format

    meta = json.loads((bundle / "experiment.xenium").read_text(encoding="utf-8"))
    sid = _sample_name(bundle, meta)
    row = Row({"sample_id": sid, "xenium_dir": _rel(bundle, base)})
    pid = _patient([str(meta.get("run_name", "")), str(meta.get("region_name", "")), str(bundle)], regex, patients, sid)
    row.values["patient_id"] = pid or ""
    if not pid:
        row.todo.append("patient_id (the grouping unit of the folds): not inferred; use --patient-regex or --patients")
    files = _files_near(bundle, shared_parent)
    found = find_he_files(bundle)
    he = found.he_path
    if he is None:
        cands = _he_candidates(files)
        he = cands[0] if len(cands) == 1 else None
        if len(cands) > 1:
            row.todo.append(f"he_path: {len(cands)} candidate images ({', '.join(p.name for p in cands[:4])})")
    if he is None:
        row.values["he_path"] = ""
        if not any(t.startswith("he_path") for t in row.todo):
            row.todo.append("he_path: no H&E image found next to the bundle")
    else:
        row.values["he_path"] = _rel(he, base)
        mpp = _he_mpp(he)
        row.values["he_mpp"] = f"{mpp:g}" if mpp else ""
        if not mpp:
            row.todo.append("he_mpp: the H&E's metadata gives no µm/px")
    keypoints, matrices, regions = [], [], []
    for p in files:
        low = p.name.lower()
        try:
            if low.endswith(".csv") and low not in ("cells.csv", "transcripts.csv"):
                kind = detect_alignment_format(p)
                if kind == "matrix":
                    matrices.append(p)
                elif "fixedx" in p.read_text(encoding="utf-8-sig")[:400].lower():
                    keypoints.append(p)
                elif detect_regions_format(p) == "explorer":
                    regions.append(p)
            elif low.endswith((".geojson", ".json")) and _is_geojson(p):
                regions.append(p)
        except InputError:
            continue
    if found.alignment is not None and he == found.he_path:
        matrices = [found.alignment] + [m for m in matrices if m != found.alignment]
    align = keypoints[0] if len(keypoints) == 1 else (matrices[0] if len(matrices) == 1 and not keypoints else None)
    if align is None and (keypoints or matrices):
        row.todo.append("alignment: several candidates (" + ", ".join(p.name for p in (keypoints + matrices)[:4]) + ")")
    row.values["alignment"] = _rel(align, base) if align is not None else ""
    row.values["regions"] = _rel(regions[0], base) if len(regions) == 1 else ""
    if len(regions) > 1:
        row.todo.append("regions: several candidates (" + ", ".join(p.name for p in regions[:4]) + ")")
    return row


def visium_row(outs: Path, *, base: Path, regex: re.Pattern[str] | None, patients: dict[str, str]) -> Row:
    """The sheet row of one Space Ranger ``outs/`` directory."""
    sid = _name(outs.parent.name if outs.name.lower() in GENERIC else outs.name)
    row = Row({"sample_id": sid, "format": "spaceranger", "spaceranger_dir": _rel(outs, base)})
    pid = _patient([str(outs)], regex, patients, sid)
    row.values["patient_id"] = pid or ""
    if not pid:
        row.todo.append("patient_id: not inferred; use --patient-regex or --patients")
    near = sorted(p for p in outs.parent.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in near if p.name.lower().endswith(HE_SUFFIXES) and "mask" not in p.name.lower()]
    if len(images) == 1:
        row.values["he_path"] = _rel(images[0], base)
    else:
        hires = outs / "spatial" / "tissue_hires_image.png"
        row.values["he_path"] = _rel(hires, base) if hires.is_file() else ""
        row.values["image_scale"] = "hires" if hires.is_file() else ""
        row.todo.append("he_path: " + (f"{len(images)} candidate images next to outs/; " if images else "") +
                        "using Space Ranger's hires PNG (image_scale hires): set the full-resolution H&E for 224 px "
                        "patches at full detail")
    caps = [p for p in near if p.suffix.lower() == ".csv" and "caption" in p.name.lower()]
    row.values["captions"] = _rel(caps[0], base) if len(caps) == 1 else ""
    return row


def _read_patients(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    df = pd.read_csv(path, sep=None, engine="python", dtype=str)
    if not {"sample_id", "patient_id"} <= set(df.columns):
        raise InputError(f"columns {list(df.columns)}", file=path, field="sample_id,patient_id",
                         expected="a table with sample_id and patient_id")
    return dict(zip(df["sample_id"].str.strip(), df["patient_id"].str.strip(), strict=True))


def _panel_genes(bundles: list[Path]) -> list[str]:
    from morphomol.io.xenium_layout import read_gene_panel

    common: set[str] | None = None
    order: list[str] = []
    for b in bundles:
        genes = read_gene_panel(b) or []
        order = order or genes
        common = set(genes) if common is None else common & set(genes)
    return [g for g in order if common and g in common]


def _write(path: Path, text: str, overwrite: bool) -> None:
    from morphomol.util.atomic import atomic_path

    if path.exists() and not overwrite:
        raise InputError("exists (use --overwrite to replace it)", file=path, expected="a new file")
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def _sheet(rows: list[Row], columns: tuple[str, ...]) -> str:
    rows = sorted(rows, key=lambda r: r.values["sample_id"])
    ids = [r.values["sample_id"] for r in rows]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(f"several inputs give the sample id(s) {dup}", field="sample_id",
                         expected="unique region names / directory names (rename, or edit the sheet)")
    used = [c for c in columns if c in ("sample_id", "patient_id") or any(r.values.get(c) for r in rows)]
    lines = [f"# TODO {r.values['sample_id']}: {t}" for r in rows for t in r.todo]
    lines.append("\t".join(used))
    lines += ["\t".join(str(r.values.get(c, "") or "") for c in used) for r in rows]
    return "\n".join(lines) + "\n"


def init_cohort(root: str | Path, *, name: str, out_dir: str | Path = "config/cohorts", relative_to: str | Path = ".",
                patient_regex: str | None = None, patients: str | Path | None = None, max_depth: int = 4,
                overwrite: bool = False) -> dict[str, Any]:
    """Write the cohort YAML(s), sample sheet(s) and panel (module docstring); returns what was written."""
    root, out, base = Path(root), Path(out_dir), Path(relative_to)
    from morphomol.util.names import check_name

    check_name(name, "--name")  # becomes out/NAME.yaml and out/NAME/: never '..', a hidden name or a path
    regex = compile_patient_regex(patient_regex)
    table = _read_patients(Path(patients) if patients else None)
    xen, sr = find_inputs(root, max_depth)
    if not xen and not sr:
        raise InputError("no Xenium bundle (experiment.xenium) and no Space Ranger outs found", file=root,
                         expected=f"bundles / outs directories within {max_depth} levels")
    written: dict[str, Any] = {"cohorts": {}}
    parents = [b.parent for b in xen]
    for kind, inputs in (("xenium", xen), ("visium", sr)):
        if not inputs:
            continue
        cname = name if kind == "xenium" or not xen else f"{name}_visium"
        if kind == "xenium":
            rows = [xenium_row(b, shared_parent=parents.count(b.parent) > 1, base=base, regex=regex, patients=table)
                    for b in inputs]
        else:
            rows = [visium_row(o, base=base, regex=regex, patients=table) for o in inputs]
        sheet = out / cname / "samples.tsv"
        _write(sheet, _sheet(rows, XENIUM_COLUMNS if kind == "xenium" else VISIUM_COLUMNS), overwrite)
        todo = [f"{r.values['sample_id']}: {t}" for r in sorted(rows, key=lambda r: r.values["sample_id"])
                for t in r.todo]  # the sheet's order
        yaml = [f"# Cohort written by `morphomol init {root}`: edit it, add `{cname}: {_rel(out / (cname + '.yaml'), base)}`",
                "# under `cohorts:` in config/config.yaml, then run `morphomol check-config`."]
        if todo:
            yaml.append(f"# TODO: {len(todo)} value(s) to fill in, listed at the top of {_rel(sheet, base)}")
        if kind == "visium":
            yaml += ["kind: visium", f"description: {len(rows)} Space Ranger samples from {root}",
                     f"samples: {_rel(sheet, base)}"]
        else:
            genes = _panel_genes(inputs)
            panel = out / cname / "panel.yaml"
            ptxt = ["# Gene panel of cohort " + cname + ". mode: hvg picks each fold's targets (add-on genes) among the",
                    "# measured genes; for fixed lists set mode: yaml and split the genes below into core (model",
                    "# input) and addon (targets).", "mode: hvg"]
            if genes:
                ptxt.append(f"# genes in every bundle's gene_panel.json ({len(genes)}): " + ", ".join(genes))
            _write(panel, "\n".join(ptxt) + "\n", overwrite)
            yaml += [f"description: {len(rows)} Xenium samples from {root}", f"samples: {_rel(sheet, base)}",
                     f"panel: {_rel(panel, base)}"]
            written.setdefault("panels", []).append(str(panel))
        cfile = out / f"{cname}.yaml"
        _write(cfile, "\n".join(yaml) + "\n", overwrite)
        written["cohorts"][cname] = {"yaml": str(cfile), "samples": str(sheet), "kind": kind, "n": len(rows),
                                     "todo": todo}
        log.info("wrote %s and %s (%d %s samples, %d TODO line(s))", sheet, cfile, len(rows), kind, len(todo))
    return written


__all__ = ["find_inputs", "init_cohort", "visium_row", "xenium_row"]
