"""``morphomol doctor``: is this machine ready to run the pipeline? One line per check, with what to do.

Checks: Python, morphomol, Snakemake and its SLURM executor plugin, torch and CUDA (the GPUs it sees),
OpenSlide, the optional ``[spatial]`` extra (spatialdata), the configuration (``load_config``), every
configured weight file (present, its sha256 unless ``checksums=False``), ``sbatch`` on PATH, and the
SLURM profile's partitions (``profiles/slurm/partitions.yaml``) and GPU models against ``sinfo``.

Each :class:`Check` has a status ``ok`` / ``warn`` / ``fail``; ``fail`` is what stops the pipeline from
running at all on this machine (the command then exits 1), ``warn`` what limits it (no GPU, no SLURM).
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from morphomol.util.logs import get_logger

log = get_logger("doctor")


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""

    def line(self) -> str:
        tag = {"ok": "[ ok ]", "warn": "[warn]", "fail": "[FAIL]"}[self.status]
        return f"{tag} {self.name}: {self.detail}" + (f" -> {self.fix}" if self.fix and self.status != "ok" else "")


def _version(mod: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(mod)
    except PackageNotFoundError:
        return None


def _run(cmd: list[str], timeout: float = 20.0) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def check_python() -> Check:
    v = sys.version_info
    ok = v >= (3, 11)
    return Check("python", "ok" if ok else "fail", f"{platform.python_version()} ({sys.executable})",
                 "use Python >= 3.11 (make install creates .venv with python3)")


def check_packages() -> list[Check]:
    out = [Check("morphomol", "ok", _version("morphomol") or "source tree (not installed)")]
    sm = _version("snakemake")
    out.append(Check("snakemake", "ok" if sm else "fail", sm or "not installed", "pip install -e . (make install)"))
    plug = _version("snakemake-executor-plugin-slurm")
    out.append(Check("slurm executor plugin", "ok" if plug else "warn", plug or "not installed",
                     "pip install snakemake-executor-plugin-slurm (needed for --profile profiles/slurm)"))
    sd = _version("spatialdata")
    out.append(Check("spatial extra", "ok" if sd else "warn", f"spatialdata {sd}" if sd else "spatialdata not installed",
                     "pip install -e '.[spatial]' for `morphomol export spatialdata` and SpatialData samples"))
    return out


def check_torch() -> list[Check]:
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken CUDA build raising at import
        return [Check("torch", "fail", f"cannot import ({type(exc).__name__}: {exc})",
                      "pip install -e . (torch is a dependency); on a cluster load no conflicting CUDA module")]
    out = [Check("torch", "ok", torch.__version__)]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        out.append(Check("cuda", "ok", f"CUDA {torch.version.cuda}, {len(names)} GPU(s): {', '.join(names)}"))
    else:
        why = "torch built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build, no GPU visible"
        out.append(Check("cuda", "warn", why, "GPU rules (features, fusion_train, fusion_clip, spots_captions, cells_train, "
                         "cells_eval) run on the CPU here; on a GPU node check `nvidia-smi` and CUDA_VISIBLE_DEVICES"))
    return out


def check_openslide() -> Check:
    try:
        import openslide
    except Exception as exc:
        return Check("openslide", "warn", f"cannot import ({exc})",
                     "pip install openslide-python openslide-bin (SVS/NDPI/MRXS need it; TIFFs fall back to tifffile)")
    lib = getattr(openslide, "__library_version__", "?")
    return Check("openslide", "ok", f"openslide-python {getattr(openslide, '__version__', '?')}, library {lib}")


def _weights(config: str | Path, workdir: Path) -> tuple[list[Check], dict[str, str]]:
    """(config check, encoder -> configured weights) of the base config and every cohort."""
    from morphomol.config import load_config

    try:
        pc = load_config(config, workdir=workdir)
    except Exception as exc:  # MorphomolError with the file/field, or anything a broken config raises
        msg = getattr(exc, "message", str(exc))
        checks = [Check("config", "fail", msg, "fix the file named above; `morphomol check-config` repeats the check")]
        return checks, _raw_weights(Path(workdir) / config)
    weights: dict[str, str] = {}
    for sections in [pc.base, *(c.cfg for c in pc.cohorts.values())]:
        for name, entry in sections.encoders.items():
            if entry.weights:
                weights.setdefault(f"{name}", str(entry.weights))
    n = sum(len(c.samples) for c in pc.cohorts.values())
    return [Check("config", "ok", f"{config}: {len(pc.cohorts)} cohort(s), {n} samples")], weights


def _raw_weights(config: Path) -> dict[str, str]:
    import yaml

    try:
        raw = yaml.safe_load(config.read_text()) or {}
    except Exception:
        return {}
    return {k: str(v["weights"]) for k, v in (raw.get("encoders") or {}).items() if isinstance(v, dict) and v.get("weights")}


def check_weights(weights: dict[str, str], workdir: Path, checksums: bool = True) -> list[Check]:
    from morphomol.util.hashing import sha256_path

    out = []
    if not weights:
        return [Check("weights", "ok", "no weights configured (encoders without weights run with random init "
                                       "where the registry allows it: vit_s)")]
    for name, w in sorted(weights.items()):
        p = Path(w) if Path(w).is_absolute() else workdir / w
        if not p.exists():
            out.append(Check(f"weights {name}", "fail", f"{w} not found",
                             f"copy the {name} weights there or fix encoders.{name}.weights (nothing is downloaded)"))
            continue
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        detail = f"{w} ({size / 1e6:.1f} MB)"
        if checksums:
            detail += f" sha256 {sha256_path(p)}"
        out.append(Check(f"weights {name}", "ok", detail))
    return out


def check_slurm(profile: Path) -> list[Check]:
    import yaml

    sbatch = shutil.which("sbatch")
    if sbatch is None:
        return [Check("sbatch", "warn", "not on PATH (not a SLURM submit host)",
                      "run locally with `snakemake --cores N`, or on the cluster's login node with --profile profiles/slurm")]
    out = [Check("sbatch", "ok", f"{sbatch} ({_run([sbatch, '--version']) or 'version unknown'})")]
    pfile = profile / "partitions.yaml"
    try:
        parts = (yaml.safe_load(pfile.read_text()) or {}).get("partitions") or {}
    except (OSError, yaml.YAMLError) as exc:
        return out + [Check("partitions", "fail", f"{pfile}: {exc}", "restore profiles/slurm/partitions.yaml")]
    sinfo = shutil.which("sinfo")
    have_out = _run([sinfo, "-h", "-o", "%P %G"]) if sinfo else None
    if have_out is None:
        return out + [Check("partitions", "warn", f"{', '.join(parts)} (sinfo unavailable: not checked)",
                            "check them with `sinfo -o \"%P %l %c %m %G\"`")]
    site: dict[str, set[str]] = {}
    for line in have_out.splitlines():
        bits = line.split(None, 1)
        if not bits:
            continue
        pname = bits[0].rstrip("*")
        gres = bits[1] if len(bits) > 1 else ""
        models = {g.split(":")[1] for g in gres.split(",") if g.startswith("gpu:") and g.count(":") >= 2}
        site.setdefault(pname, set()).update(models)
    for pname, lim in parts.items():
        if pname not in site:
            out.append(Check(f"partition {pname}", "fail", "in partitions.yaml but not on this cluster (sinfo)",
                             f"rename it in {pfile} to one of: {', '.join(sorted(site))}"))
            continue
        want = set((lim or {}).get("available_gpu_models") or [])
        missing = want - site[pname]
        if missing:
            out.append(Check(f"partition {pname}", "fail", f"GPU model(s) {', '.join(sorted(missing))} not in its GRES "
                             f"({', '.join(sorted(site[pname])) or 'none'})", f"fix available_gpu_models in {pfile}"))
        else:
            out.append(Check(f"partition {pname}", "ok", f"GPU models {', '.join(sorted(want)) or 'none (CPU)'}"))
    try:
        cfg = yaml.safe_load((profile / "config.v8+.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    offered = {m for lim in parts.values() for m in ((lim or {}).get("available_gpu_models") or [])}
    for rule, res in (cfg.get("set-resources") or {}).items():
        model = (res or {}).get("gpu_model")
        if model and str(model).strip('"') not in offered:
            out.append(Check(f"rule {rule}", "fail", f"gpu_model {model} is offered by no partition of partitions.yaml",
                             "set gpu_model to a model of available_gpu_models (SITE SETTINGS 1b)"))
    return out


def run_doctor(config: str | Path = "config/config.yaml", *, workdir: str | Path = ".",
               profile: str | Path = "profiles/slurm", checksums: bool = True) -> list[Check]:
    """Every check, in order (module docstring)."""
    wd = Path(workdir)
    checks = [check_python(), *check_packages(), *check_torch(), check_openslide()]
    cfg_checks, weights = _weights(config, wd)
    checks += cfg_checks
    checks += check_weights(weights, wd, checksums)
    checks += check_slurm(wd / profile)
    return checks


__all__ = ["Check", "check_slurm", "check_weights", "run_doctor"]
