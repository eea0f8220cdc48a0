"""Files a Xenium bundle may ship beside its outputs: the post-Xenium H&E and its alignment.

Newer 10x datasets (and Xenium Explorer's "image alignment" export) come with
``<prefix>he_image.ome.tif`` (the H&E, pyramidal OME-TIFF) and ``<prefix>he_imagealignment.csv``
(headerless 3x3, H&E px -> morphology px). When a sample sheet leaves ``he_path`` (and
``alignment``) empty, :func:`find_he_files` looks for them inside the bundle directory, then in
its parent directory (where the 10x downloads put them next to the unpacked ``outs``). A file in
the parent must share the bundle directory's name prefix when the parent holds several bundles'
images. Torch-free and cheap: runs when the configuration is loaded (so ``snakemake -n`` knows the
files).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from morphomol.errors import InputError

HE_IMAGE_SUFFIXES = ("he_image.ome.tif", "he_image.ome.tiff")
ALIGNMENT_SUFFIX = "he_imagealignment.csv"


@dataclass(frozen=True)
class HEFiles:
    """What :func:`find_he_files` found (``None`` where nothing was found)."""

    he_path: Path | None
    alignment: Path | None
    where: str = ""


def _candidates(d: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_file() and p.name.lower().endswith(suffixes)
                  and not p.name.startswith("."))


def _prefix(p: Path, suffixes: tuple[str, ...]) -> str:
    low = p.name.lower()
    for s in suffixes:
        if low.endswith(s):
            return p.name[: len(p.name) - len(s)].rstrip("_-. ")
    return p.stem


def _key(bundle: Path) -> str:
    """The bundle directory's name without a trailing ``outs`` / ``output`` (10x download names)."""
    k = bundle.name.lower()
    for tail in ("outs", "output", "out"):
        if k.endswith(tail) and len(k) > len(tail):
            k = k[: -len(tail)]
            break
    return k.rstrip("_-. ")


def _pick(found: list[Path], bundle: Path, suffixes: tuple[str, ...], what: str, in_parent: bool) -> Path | None:
    """The one candidate of this bundle: alone inside the bundle, else the one whose name prefix and the
    bundle's name start alike (a parent shared by several bundles); None or an error when ambiguous."""
    if not found:
        return None
    if len(found) == 1 and (not in_parent or not _prefix(found[0], suffixes)):
        return found[0]
    key = _key(bundle)
    match = [p for p in found if (pre := _prefix(p, suffixes).lower().rstrip("_-. "))
             and (key.startswith(pre) or pre.startswith(key))]
    if len(match) == 1:
        return match[0]
    if len(match) > 1 or not in_parent:
        raise InputError(f"{len(found)} candidate {what} files for bundle {bundle.name}: "
                         + ", ".join(p.name for p in found[:5]), file=bundle.parent if in_parent else bundle,
                         field="he_path", expected=f"one {what} per bundle, or he_path / alignment in the sample sheet")
    return None


def find_he_files(bundle_dir: str | Path) -> HEFiles:
    """The bundle's ``*he_image.ome.tif`` and ``*he_imagealignment.csv`` (inside, then next to it)."""
    d = Path(bundle_dir)
    for where, folder, in_parent in (("bundle", d, False), ("parent", d.parent, True)):
        he = _pick(_candidates(folder, HE_IMAGE_SUFFIXES), d, HE_IMAGE_SUFFIXES, "H&E image", in_parent)
        if he is None:
            continue
        al_found = _candidates(folder, (ALIGNMENT_SUFFIX,))
        al = None
        if al_found:
            pre = _prefix(he, HE_IMAGE_SUFFIXES).lower()
            same = [a for a in al_found if _prefix(a, (ALIGNMENT_SUFFIX,)).lower() == pre]
            al = same[0] if same else (al_found[0] if len(al_found) == 1 and not in_parent else None)
        return HEFiles(he, al, where)
    return HEFiles(None, None, "")


__all__ = ["ALIGNMENT_SUFFIX", "HEFiles", "HE_IMAGE_SUFFIXES", "find_he_files"]
