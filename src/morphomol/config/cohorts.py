"""Cohorts: the cohort YAML, its sample sheet and panel, merged with config.yaml into typed sections.

:func:`load_config` is what ``workflow/rules/common.smk`` and ``morphomol check-config`` call:
it validates ``config.yaml`` (strict schema, defaults filled), every cohort YAML (its own keys +
section overrides, validated against the same strict schema after merging), every sample sheet
(per cohort kind) and panel, then runs each study's own checks (settings file, encoders, folds vs
patients, panel genes...) so that everything checkable without reading the large data files fails
before any job runs, naming the file and the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from morphomol.config.kinds import CohortKind, get_kind
from morphomol.config.schema import deep_merge, read_yaml, validate
from morphomol.config.sections import SECTIONS, Sections, build_sections
from morphomol.errors import InputError

#: Keys of a cohort YAML besides section overrides.
COHORT_KEYS = ("description", "kind", "studies", "samples", "panel", "simulate")


@dataclass(frozen=True)
class Panel:
    """Core (model input) and add-on (target) genes of a cohort; ``mode: hvg`` picks targets per fold."""

    mode: str
    core: tuple[str, ...]
    addon: tuple[str, ...]
    n_targets: int | None = None
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mode": self.mode, "core": list(self.core), "addon": list(self.addon)}
        if self.n_targets is not None:
            d["n_targets"] = self.n_targets
        return d


@dataclass(frozen=True)
class Cohort:
    """One cohort: merged typed sections, its sample sheet (indexed by sample_id) and panel."""

    name: str
    path: Path
    kind: CohortKind
    studies: tuple[str, ...]
    cfg: Sections
    samples: pd.DataFrame = field(repr=False)
    sheet_path: Path
    panel: Panel | None = None
    simulate: dict[str, Any] | None = None
    overrides: dict[str, Any] = field(default_factory=dict, repr=False)

    @cached_property
    def sample_ids(self) -> list[str]:
        """Sample ids in sheet order (computed once: input functions ask for it in every job of the DAG)."""
        return [str(s) for s in self.samples.index]

    def sample(self, sample_id: str) -> dict[str, Any]:
        """One sheet row with empty cells as None (numbers as float)."""
        row = self.samples.loc[sample_id].to_dict()
        return {k: _clean(v) for k, v in row.items()}

    def field(self, sample_id: str, column: str) -> Any:
        if column not in self.samples.columns:
            return None
        return _clean(self.samples.at[sample_id, column])

    def patients(self) -> dict[str, str]:
        """sample_id -> patient_id (computed once)."""
        return self._patients

    @cached_property
    def _patients(self) -> dict[str, str]:
        return {str(s): str(p) for s, p in zip(self.samples.index, self.samples["patient_id"], strict=True)}

    def source_of(self, section: str) -> Path | None:
        """The file a section's value comes from (the cohort YAML when it overrides it)."""
        return self.path if section in self.overrides else None


@dataclass(frozen=True)
class PipelineConfig:
    config_file: Path
    workdir: Path
    raw: dict[str, Any] = field(repr=False)
    base: Sections
    cohorts: dict[str, Cohort]


def _clean(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str) and value.strip() == "":
        return None
    return value


def read_sample_sheet(path: str | Path, kind: CohortKind | str = "xenium", *, check_files: bool = True,
                      workdir: str | Path | None = None) -> pd.DataFrame:
    """Read and validate a sample sheet TSV of a cohort kind; a DataFrame indexed by sample_id
    (strings; numeric columns as float, empty cells NaN)."""
    kind = get_kind(kind) if isinstance(kind, str) else kind
    path = Path(path)
    if not path.is_file():
        raise InputError("sample sheet not found" + (" (it is a directory)" if path.is_dir() else ""), file=path)
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, comment="#", keep_default_na=False)
    except Exception as exc:  # pandas raises several types for malformed TSV
        raise InputError(f"cannot parse sample sheet: {exc}", file=path) from exc
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in kind.required if c not in df.columns]
    if missing:
        raise InputError(f"missing column(s) {missing}; found {list(df.columns)}", file=path, field=missing[0],
                         expected=f"a {kind.name} sample sheet with columns " + ", ".join(kind.required))
    unknown = [c for c in df.columns if c not in kind.columns]
    if unknown:
        raise InputError(f"unknown column(s) {unknown}", file=path, field=unknown[0],
                         expected="columns " + ", ".join(kind.columns))
    if df.empty:
        raise InputError("sample sheet has no rows", file=path)
    for col in kind.columns:
        if col not in df.columns:
            df[col] = ""
    df = df[list(kind.columns)].apply(lambda s: s.str.strip())
    for i, rec in enumerate(df.to_dict("records")):
        row = i + 2  # line number in the file (header is line 1)
        rec = {k: v for k, v in rec.items() if v != ""}
        for col in kind.numeric_columns:
            if col in rec:
                try:
                    value = float(rec[col])
                except ValueError:
                    raise InputError(f"row {row}: {col} {rec[col]!r} is not a number", file=path, field=col,
                                     expected="a positive number") from None
                if not math.isfinite(value):
                    raise InputError(f"row {row}: {col} {rec[col]!r} is not a finite number", file=path, field=col,
                                     expected="a positive number, or an empty cell to use the file's metadata")
                rec[col] = value
        validate(rec, kind.sheet_schema, path, row=row, set_defaults=False)
    dup = df.loc[df["sample_id"].duplicated(keep=False), "sample_id"]
    if len(dup):
        lines = [str(i + 2) for i in dup.index]
        raise InputError(f"duplicate sample_id {sorted(set(dup))} on rows {', '.join(lines)}", file=path,
                         field="sample_id", expected="unique sample ids")
    for col in kind.numeric_columns:
        df[col] = pd.to_numeric(df[col].replace("", None), errors="coerce")
    if check_files:
        base = Path(workdir) if workdir is not None else Path.cwd()
        for i, rec in enumerate(df.to_dict("records")):
            for col in kind.path_columns:
                val = rec.get(col) or ""
                if not val:
                    continue
                p = base / val
                where = f"row {i + 2} (sample {rec['sample_id']})"
                if not p.exists():
                    raise InputError(f"{where}: file not found: {val}", file=path, field=col)
                if col in kind.dir_columns and not p.is_dir():
                    raise InputError(f"{where}: {val} is a file", file=path, field=col, expected="a directory")
                if col not in kind.dir_columns and p.is_dir():
                    raise InputError(f"{where}: {val} is a directory", file=path, field=col, expected="a file")
    return df.set_index("sample_id", drop=False)


def read_panel(path: str | Path, mode: str) -> Panel:
    """Read a panel YAML (``core`` / ``addon`` gene lists, or ``mode: hvg``)."""
    path = Path(path)
    data = read_yaml(path, "panel YAML") or {}
    if not isinstance(data, dict):
        raise InputError("panel must be a mapping with 'core' and 'addon' lists", file=path)
    validate(data, "panel.schema.yaml", path, set_defaults=False)
    mode = "hvg" if data.get("mode") == "hvg" else mode
    core = [str(g) for g in data.get("core") or []]
    addon = [str(g) for g in data.get("addon") or []]
    if mode == "yaml":
        for key, genes in (("core", core), ("addon", addon)):
            if not genes:
                raise InputError(f"'{key}' gene list is empty", file=path, field=key,
                                 expected="at least one gene (or panels.mode: hvg)")
    for key, genes in (("core", core), ("addon", addon)):
        dups = sorted({g for g in genes if genes.count(g) > 1})
        if dups:
            raise InputError(f"duplicate genes {dups}", file=path, field=key)
    both = sorted(set(core) & set(addon))
    if both:
        raise InputError(f"genes in both core and addon: {both}", file=path, field="addon", expected="disjoint lists")
    n = data.get("n_targets")
    return Panel(mode=mode, core=tuple(core), addon=tuple(addon), n_targets=int(n) if n else None, path=path)


def load_cohort(name: str, cpath: str | Path, raw_base: dict[str, Any], *, workdir: Path,
                config_file: Path) -> Cohort:
    from morphomol import studies

    cfile = workdir / cpath
    cdata = read_yaml(cfile, f"cohort '{name}' YAML (config cohorts.{name})") or {}
    if not isinstance(cdata, dict):
        raise InputError("cohort YAML must be a mapping", file=cfile)
    unknown = [k for k in cdata if k not in COHORT_KEYS and k not in SECTIONS]
    if unknown:
        raise InputError(f"unknown key '{unknown[0]}'", file=cfile, field=unknown[0],
                         expected="one of " + ", ".join([*COHORT_KEYS, *SECTIONS]))
    own = {k: v for k, v in cdata.items() if k in COHORT_KEYS}
    validate(own, "cohort.schema.yaml", cfile)
    overrides = {k: v for k, v in cdata.items() if k in SECTIONS}
    merged = deep_merge(raw_base, overrides)
    merged["cohorts"] = {name: str(cpath)}
    # the merged sections obey the same strict schema; errors name the cohort file
    validate(merged, "config.schema.yaml", cfile)
    merged.pop("cohorts")
    kind = get_kind(own.get("kind", "xenium"), file=cfile)
    study_names = tuple(own.get("studies") or kind.studies)
    for s in study_names:
        spec = studies.get_study(s, file=cfile)
        if kind.name not in spec.cohort_kinds:
            raise InputError(f"study '{s}' does not run on {kind.name} cohorts", file=cfile, field="studies",
                             expected=f"a study for kind {kind.name}: " + ", ".join(studies.studies_for_kind(kind.name)))
    simulate = own.get("simulate")
    samples_path = workdir / own["samples"]
    samples = read_sample_sheet(samples_path, kind, check_files=simulate is None, workdir=workdir)
    if kind.resolve is not None:  # defaults and discovered files (e.g. a bundle's H&E), before any job
        samples = kind.resolve(samples, sheet=samples_path, workdir=workdir, simulated=simulate is not None)
    panel = None
    if own.get("panel"):
        panel = read_panel(workdir / own["panel"], merged["panels"]["mode"])
    elif kind.needs_panel:
        raise InputError("missing required field", file=cfile, field="panel",
                         expected=f"a panel YAML for a {kind.name} cohort")
    cfg = build_sections(merged)
    return Cohort(name=name, path=cfile, kind=kind, studies=study_names, cfg=cfg, samples=samples,
                  sheet_path=samples_path, panel=panel, simulate=simulate, overrides=overrides)


def check_encoders(cfg: Sections, *, file: Path, cohort: Cohort | None = None, workdir: Path) -> None:
    """Registered encoder names, existing local weights, known feature encoders."""
    from morphomol.encoders.registry import get_spec, list_encoders

    known = sorted(s.name for s in list_encoders())
    for name, entry in cfg.encoders.items():
        src = cohort.source_of("encoders") if cohort is not None else None
        if name not in known:
            raise InputError(f"unknown encoder '{name}'", file=src or file, field=f"encoders.{name}",
                             expected="one of " + ", ".join(known))
        w = entry.weights
        if w and not (workdir / w).exists():
            raise InputError(f"weights not found: {w}", file=src or file, field=f"encoders.{name}.weights",
                             expected="a local file or directory (nothing is downloaded)")
    for name in cfg.features.encoders:
        if name not in known:
            src = cohort.source_of("features") if cohort is not None else None
            raise InputError(f"unknown feature encoder '{name}'", file=src or file, field="features.encoders",
                             expected="encoders of the registry: " + ", ".join(known))
        get_spec(name)


def load_config(config: dict[str, Any] | str | Path, *, config_file: str | Path = "config/config.yaml",
                workdir: str | Path | None = None, preflight: bool = True) -> PipelineConfig:
    """Validate the configuration (in place: schema defaults are filled) and load every cohort.

    ``config`` is the parsed ``config.yaml`` (Snakemake's ``config``) or its path. ``preflight``: run the studies'
    per-sample pre-flight checks that read input files (False inside a cluster job: the submitting process did).
    """
    from morphomol import studies

    workdir = Path(workdir) if workdir is not None else Path.cwd()
    if not isinstance(config, dict):
        config_file = Path(config)
        config = read_yaml(workdir / config_file, "config") or {}
        if not isinstance(config, dict):
            raise InputError("config must be a mapping", file=config_file)
    config_file = Path(config_file)
    validate(config, "config.schema.yaml", config_file)
    raw_base = {k: config[k] for k in SECTIONS if k in config}
    base = build_sections(raw_base)
    check_encoders(base, file=config_file, workdir=workdir)
    cohorts: dict[str, Cohort] = {}
    for name, cpath in config["cohorts"].items():
        cohort = load_cohort(name, cpath, raw_base, workdir=workdir, config_file=config_file)
        check_encoders(cohort.cfg, file=config_file, cohort=cohort, workdir=workdir)
        for s in cohort.studies:
            studies.get_study(s).check(cohort, workdir=workdir, config_file=config_file, preflight=preflight)
        cohorts[name] = cohort
    return PipelineConfig(config_file=config_file, workdir=workdir, raw=config, base=base, cohorts=cohorts)


def default_sections(**overrides: Any) -> Sections:
    """Sections with every schema default (tests, notebooks); ``overrides`` are section mappings."""
    from morphomol.config.schema import schema_defaults

    data = schema_defaults("config.schema.yaml", cohorts={"x": "x.yaml"})
    data.pop("cohorts")
    data = deep_merge(data, overrides)
    validate({"cohorts": {"x": "x.yaml"}, **data}, "config.schema.yaml", None)
    return build_sections(data)
