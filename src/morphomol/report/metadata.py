"""Run metadata of a cohort's tables: config, package versions, weight checksums, which settings
could run, and per-run bookkeeping (``run_metadata.json`` / ``run_metadata.md``)."""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from morphomol.report.render import md_escape
from morphomol.report.runs import RunResults
from morphomol.util.hashing import sha256_path
from morphomol.util.jsonio import json_safe

PACKAGES: tuple[str, ...] = (
    "morphomol", "snakemake", "snakemake-executor-plugin-slurm", "torch", "torchvision", "timm",
    "numpy", "pandas", "pyarrow", "scipy", "scikit-learn", "zarr", "anndata", "scanpy",
    "openslide-python", "openslide-bin", "tifffile", "matplotlib", "safetensors", "transformers",
    "open_clip_torch",
)


def package_versions(packages: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None when not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def weights_checksum(path: str | Path) -> dict[str, Any]:
    """``path, exists`` and, for a file, ``bytes, sha256``; for a directory (HF snapshot) ``bytes``
    and ``files`` (relative name -> sha256)."""
    path = Path(path)
    if not path.exists():
        return {"path": str(path), "exists": False}
    if path.is_file():
        return {"path": str(path), "exists": True, "bytes": path.stat().st_size, "sha256": sha256_path(path)}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {"path": str(path), "exists": True, "bytes": int(sum(p.stat().st_size for p in files)),
            "files": {str(p.relative_to(path)): sha256_path(p) for p in files}}


def _fields(setting: Any) -> dict[str, Any]:
    return dict(setting) if isinstance(setting, Mapping) else dict(setting.to_dict())


def run_metadata(*, cohort: str | None, config: Any, settings: Mapping[str, Any],
                 reasons: Mapping[str, str | None], results: RunResults,
                 weights: Mapping[str, str | None] | None) -> dict[str, Any]:
    """The JSON-safe metadata dict: ``cohort, python, platform, packages, weights`` (checksums of the
    configured weights, encoder -> path), ``settings`` (runnable, reason + the setting's fields;
    a setting is a mapping or has ``to_dict()``), ``runs`` (the fold table without paths), ``config``."""
    checks = {name: weights_checksum(w) for name, w in (weights or {}).items() if w}
    runs = results.folds.drop(columns=[c for c in ("path",) if c in results.folds]).to_dict(orient="records")
    return json_safe({
        "cohort": cohort,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "weights": checks,
        "settings": {n: {"runnable": reasons.get(n) is None, "reason": reasons.get(n), **_fields(s)}
                     for n, s in settings.items()},
        "runs": runs,
        "config": config if config is not None else {},
    })


def render_metadata_md(meta: Mapping[str, Any]) -> str:
    """Markdown view of :func:`run_metadata`."""
    lines = [f"# Run metadata{' — ' + md_escape(meta['cohort']) if meta.get('cohort') else ''}", "",
             f"Python {meta.get('python')} on {md_escape(meta.get('platform'))}", "", "## Packages", "",
             "| package | version |", "|:---|:---|"]
    for k, v in (meta.get("packages") or {}).items():
        lines.append(f"| {md_escape(k)} | {md_escape(v or 'not installed')} |")
    lines += ["", "## Weights", ""]
    if meta.get("weights"):
        lines += ["| encoder | path | sha256 |", "|:---|:---|:---|"]
        for k, v in meta["weights"].items():
            sha = v.get("sha256") or ("missing" if not v.get("exists") else f"{len(v.get('files', {}))} files")
            lines.append(f"| {md_escape(k)} | {md_escape(v['path'])} | {md_escape(sha)} |")
    else:
        lines.append("No pretrained weights configured.")
    lines += ["", "## Settings", "", "| setting | runnable | reason |", "|:---|:---|:---|"]
    for k, v in (meta.get("settings") or {}).items():
        lines.append(f"| {md_escape(k)} | {'yes' if v.get('runnable') else 'no'} | {md_escape(v.get('reason') or '')} |")
    lines += ["", "## Runs", "", "| setting | fold | status | epochs | best epoch | train s |", "|:---|---:|:---|---:|---:|---:|"]
    for r in meta.get("runs") or []:
        lines.append(f"| {md_escape(r['setting'])} | {r['fold']} | {md_escape(r['status'])} | {r.get('epochs_run')} | "
                     f"{r.get('best_epoch')} | {r.get('train_seconds')} |")
    lines += ["", "## Config", "", "```json", json.dumps(meta.get("config"), indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def write_metadata(meta: Mapping[str, Any], json_path: str | Path | None = None,
                   md_path: str | Path | None = None) -> dict[str, Path]:
    """Write ``run_metadata.json`` (sorted keys) and/or ``run_metadata.md``; returns name -> path."""
    from morphomol.report.render import write_text
    from morphomol.util.jsonio import write_json

    out: dict[str, Path] = {}
    if json_path:
        out["run_metadata.json"] = write_json(json_path, meta, indent=2, sort_keys=True)
    if md_path:
        out["run_metadata.md"] = write_text(md_path, render_metadata_md(meta))
    return out
