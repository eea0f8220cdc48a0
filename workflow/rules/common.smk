# Shared by every stage: configuration loading, validation and path helpers.
import os
from pathlib import Path

from snakemake.utils import min_version, validate

from morphomol.config import load_cohorts, load_settings, setting_status
from snakemake.exceptions import WorkflowError

from morphomol.errors import MorphomolError

min_version("9.0")


configfile: "config/config.yaml"


# Schema validation (fills defaults); the library repeats it per cohort with file/row/field errors.
validate(config, "../schemas/config.schema.yaml")

try:
    _COHORT_OBJS = load_cohorts(config, Path(workflow.basedir) / "workflow" / "schemas", workdir=Path.cwd())
    SETTINGS = load_settings(config["experiments"]["settings_file"])
except MorphomolError as _exc:
    raise WorkflowError(f"invalid configuration: {_exc.message}")

COHORTS = {name: c.as_dict() for name, c in _COHORT_OBJS.items()}
SAMPLE_DIR = "results/{cohort}/samples/{sample}"
NAME = "[A-Za-z0-9_.-]+"


wildcard_constraints:
    cohort=NAME,
    sample=NAME,
    encoder=NAME,
    setting=NAME,
    fold=r"\d+",


def ccfg(w, section):
    """Merged config section for the cohort named by wildcards ``w`` (or a cohort name)."""
    name = w if isinstance(w, str) else w.cohort
    return COHORTS[name].get(section, {})


def _clean(value):
    if value is None:
        return None
    try:
        import math

        if isinstance(value, float) and math.isnan(value):
            return None
    except TypeError:
        pass
    return None if value == "" else value


def sample_field(name):
    """Input/params function returning one sample-sheet field for wildcards (cohort, sample)."""

    def get(w):
        return _clean(COHORTS[w.cohort]["samples"].loc[w.sample, name])

    return get


def samples_of(cohort):
    return list(COHORTS[cohort]["samples"].index)


def folds_of(cohort):
    return list(range(int(ccfg(cohort, "splits").get("n_folds", 4))))


def setting_reason(cohort, setting):
    """None if ``setting`` can run for ``cohort``; otherwise why not (e.g. missing weights)."""
    return setting_status(SETTINGS[setting], ccfg(cohort, "encoders"))


def runnable_settings(cohort, kind=None):
    out = []
    for name, s in SETTINGS.items():
        if setting_reason(cohort, name) is not None:
            continue
        if kind is not None and s.get("kind", "regression") != kind:
            continue
        out.append(name)
    return out


def runnable_runs(cohort):
    """Run directories results/{cohort}/runs/{setting}/fold{k} of every runnable setting."""
    return [f"results/{cohort}/runs/{s}/fold{k}" for s in runnable_settings(cohort) for k in folds_of(cohort)]


def feature_encoders(cohort):
    """Encoders whose cached features are extracted (configured and with weights when they need them)."""
    from morphomol.encoders import get_spec

    out = []
    enc_cfg = ccfg(cohort, "encoders")
    for name in ccfg(cohort, "features").get("encoders", []):
        spec = get_spec(name)
        if spec.requires_weights and not (enc_cfg.get(name) or {}).get("weights"):
            continue
        out.append(name)
    return out


def all_targets():
    """Default target: every sample's stores and every cohort's tables and report inputs."""
    out = []
    for c in COHORTS:
        for s in samples_of(c):
            d = f"results/{c}/samples/{s}"
            out += [f"{d}/qc", f"{d}/registration.json", f"{d}/tiles.parquet", f"{d}/tokens.zarr"]
    return out + tables_targets()
