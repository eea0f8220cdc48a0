# Shared by every rules file: the typed configuration, the results paths, wildcard constraints and
# the input functions of the shared stages. Building the DAG imports no torch (config, settings and the
# encoder registry are torch-free).
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

min_version("9.0")

sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))
from paths import WorkflowPaths  # noqa: E402  (workflow/paths.py: every results path, once)

from morphomol.config import load_config  # noqa: E402
from morphomol.config.sections import to_plain  # noqa: E402
from morphomol.errors import MorphomolError  # noqa: E402
from morphomol.io.sheets import INGESTED, sample_sources  # noqa: E402
from morphomol.io.xenium_layout import bundle_files  # noqa: E402
from morphomol.util.offline import offline_environment  # noqa: E402

# No hub at run time: every job inherits HF_HUB_OFFLINE=1 ... (morphomol.util.offline; README "Offline")
offline_environment()

# Snakemake's own config loader says only "not valid JSON or YAML": read config.yaml with the loader of
# `morphomol check-config` first, so that a YAML error (a `!!python` tag, a tab) names file, line, column.
# (Files given with --configfile are parsed by Snakemake before this file runs: check-config names theirs.)
from morphomol.config.schema import read_yaml  # noqa: E402

if Path("config/config.yaml").is_file():
    try:
        read_yaml("config/config.yaml", "config")
    except MorphomolError as _exc:
        raise WorkflowError(f"invalid configuration: {_exc.message}")


configfile: "config/config.yaml"


_CONFIG_FILE = (list(workflow.overwrite_configfiles) or ["config/config.yaml"])[-1]
try:
    # a cluster job re-parses the workflow: the per-sample pre-flight (reading input files) ran at submission
    PIPELINE = load_config(config, config_file=_CONFIG_FILE, workdir=Path.cwd(), preflight=not workflow.remote_exec)
except MorphomolError as _exc:
    raise WorkflowError(f"invalid configuration: {_exc.message}")

COHORTS = PIPELINE.cohorts
P = WorkflowPaths()
NAME = r"[A-Za-z0-9_-][A-Za-z0-9_.-]*"  # no '.', '..' or hidden names
#: study name -> function(cohort) -> final outputs of the study for that cohort (registered by each study's rules)
STUDY_TARGETS = {}


wildcard_constraints:
    cohort=NAME,
    sample=NAME,
    encoder=NAME,
    setting=NAME,
    fold=r"\d+",


def cohort_of(w):
    """The Cohort of wildcards ``w`` (or of a cohort name)."""
    return COHORTS[w if isinstance(w, str) else w.cohort]


def cfg_of(w):
    """Typed config sections (morphomol.config.Sections) of the cohort of ``w``."""
    return cohort_of(w).cfg


def samples_of(cohort):
    return cohort_of(cohort).sample_ids


def folds_of(cohort):
    return list(range(cfg_of(cohort).splits.n_folds))


def kind_cohorts(kind):
    """Regex matching exactly the cohorts of one kind (wildcard constraint of that kind's rules)."""
    names = sorted(re.escape(c) for c, co in COHORTS.items() if co.kind.name == kind)
    return "|".join(names) if names else "(?!)"


def study_cohorts(study):
    return [c for c, co in COHORTS.items() if study in co.studies]


def study_cohort_regex(study):
    names = sorted(re.escape(c) for c in study_cohorts(study))
    return "|".join(names) if names else "(?!)"


def sample_field(column):
    """Input / params function: one sample-sheet cell (None when empty) for wildcards (cohort, sample)."""

    def get(w):
        return cohort_of(w).field(w.sample, column)

    return get


def section(name):
    """Params function: one config section of the cohort as plain data (dicts, lists, numbers), so that
    Snakemake reruns the job when a value changes; the script rebuilds the typed section
    (``morphomol.config.typed``)."""

    def get(w):
        return to_plain(getattr(cfg_of(w), name))

    return get


def mem_mb(base, per_mb=0.0, *inputs, per_sample=0.0, cap=None):
    """Resource function: ``mem_mb`` of a heavy job from its size (``morphomol.util.sizes``) --
    ``base + per_mb × MB of the named inputs`` (all inputs when none are named; zarr directories summed)
    ``+ per_sample × samples of the cohort``, times the attempt (a retried job asks for more)."""
    from morphomol.util.sizes import path_size_mb, sized_mb

    def get(wildcards, input, attempt):
        files = [f for n in inputs for f in _as_list(input.get(n, []))] if inputs else list(input)
        n = len(samples_of(wildcards.cohort)) if per_sample else 0
        return sized_mb(base, per_mb, path_size_mb(files) if per_mb else 0.0, per_unit_mb=per_sample, units=n,
                        attempt=attempt, cap_mb=cap)

    return get


def runtime_min(base, per_mb=0.0, *inputs, per_sample=0.0):
    """Resource function: ``runtime`` (minutes) from the job's size, like :func:`mem_mb`."""
    from morphomol.util.sizes import path_size_mb, sized_runtime

    def get(wildcards, input, attempt):
        files = [f for n in inputs for f in _as_list(input.get(n, []))] if inputs else list(input)
        n = len(samples_of(wildcards.cohort)) if per_sample else 0
        return sized_runtime(base, per_mb, path_size_mb(files) if per_mb else 0.0, per_unit_min=per_sample, units=n,
                             attempt=attempt)

    return get


def _as_list(x):
    return [x] if isinstance(x, str) else list(x)


def resource(name):
    """Resource function: an integer of the cohort's `resources` config section."""

    def get(w):
        return int(getattr(cfg_of(w).resources, name))

    return get


# ------------------------------------------------------------------ xenium bundles
#: files a simulated bundle holds (workflow/rules/simulate.smk writes them)
SIMULATED_XENIUM = {
    "experiment": "xenium/experiment.xenium",
    "transcripts": "xenium/transcripts.parquet",
    "morphology": "xenium/morphology_focus.ome.tif",
}


def sources(w):
    """Where the sample's inputs are, whatever its format (morphomol.io.sheets.sample_sources)."""
    return sample_sources(cohort_of(w), w.sample, P)


def xenium_dir(w):
    """The Xenium bundle to read: the sheet's, or the converted bundle of a SpatialData / HEST sample."""
    return sources(w).xenium_dir


def he_path(w):
    """The sample's H&E: the sheet's (or discovered / HEST default) he_path; SpatialData: the converted OME-TIFF."""
    return sources(w).he_path


def hest_file(w, name):
    """transcripts / metadata of a HEST-1k sample (hest_id filled from sample_id when the config loaded)."""
    from morphomol.io.hest import hest_xenium_files

    c = cohort_of(w)
    return hest_xenium_files(c.field(w.sample, "hest_dir"), c.field(w.sample, "hest_id") or w.sample)[name]


def xenium_inputs(*names):
    """Input function: the files of the sample's Xenium bundle that a rule reads (experiment.xenium,
    the transcript table, the morphology image), so that a rewritten file reruns its dependants."""

    def get(w):
        c = cohort_of(w)
        if c.simulate is not None:
            return {n: P.simulated(SIMULATED_XENIUM[n], w.cohort, w.sample) for n in names}
        conv = sources(w).ingested
        if conv:  # converted bundles have no morphology image
            return {n: conv[n] for n in names if n in ("experiment", "transcripts")}
        found = bundle_files(Path(xenium_dir(w)), morphology="morphology" in names)
        return {n: str(found[n]) for n in names if n in found}

    return get


def register_inputs(w):
    """the bundle's files and the H&E always; alignment / regions when the sample sheet names them (a
    pre-aligned sample: the alignment its ingest rule wrote)."""
    src = sources(w)
    files = {**xenium_inputs("experiment", "transcripts", "morphology")(w), "he": src.he_path}
    for col in ("alignment", "regions"):
        value = getattr(src, col)
        if value:
            files[col] = value
    return files


# ------------------------------------------------------------------ feature cache
def feature_encoders(cohort):
    """Encoders whose cached features are extracted (configured, and with weights when they need them)."""
    from morphomol.encoders.registry import get_spec

    c = cfg_of(cohort)
    return [e for e in c.features.encoders if not (get_spec(e).requires_weights and not c.weights(e))]


def all_targets():
    """Default target: every study's outputs for every cohort that runs it."""
    out = []
    for c, co in COHORTS.items():
        for s in co.studies:
            out += STUDY_TARGETS[s](c)
    return out
