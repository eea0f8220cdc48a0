"""Load and validate the workflow configuration: config.yaml, cohort YAMLs, sample sheets, panels.

Used by ``workflow/rules/common.smk`` and by the CLI. Every problem is reported as one
:class:`~morphomol.errors.InputError` naming the file, the row (for sheets) and the field.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pandas as pd
import yaml

from morphomol.errors import InputError

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
PATH_COLUMNS = ("xenium_dir", "he_path", "alignment", "regions")
SHEET_COLUMNS = ("sample_id", "patient_id", "xenium_dir", "he_path", "he_mpp", "alignment", "regions")
# Top-level sections a cohort YAML may override.
SECTIONS = (
    "seed", "io", "registration", "tiling", "tokens", "panels", "splits", "encoders",
    "features", "model", "training", "experiments", "tables", "resources",
)


@dataclass
class Cohort:
    """One cohort with its merged configuration."""

    name: str
    path: Path
    config: dict[str, Any]
    samples: pd.DataFrame  # indexed by sample_id
    panel: dict[str, Any]
    simulate: dict[str, Any] | None = None
    sheet_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.config)
        d.update(name=self.name, samples=self.samples, panel=self.panel, simulate=self.simulate)
        return d


def read_yaml(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found", file=path)
    try:
        with open(path) as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise InputError(f"not valid YAML: {exc}", file=path) from exc


def _validator(schema_path: Path, set_defaults: bool) -> jsonschema.protocols.Validator:
    with open(schema_path) as fh:
        schema = yaml.safe_load(fh)
    cls = jsonschema.Draft202012Validator
    if set_defaults:
        validate_props = cls.VALIDATORS["properties"]

        def set_default(validator, properties, instance, schema):  # type: ignore[no-untyped-def]
            if isinstance(instance, dict):
                for prop, sub in properties.items():
                    if isinstance(sub, dict) and "default" in sub:
                        instance.setdefault(prop, copy.deepcopy(sub["default"]))
            yield from validate_props(validator, properties, instance, schema)

        cls = jsonschema.validators.extend(cls, {"properties": set_default})
    return cls(schema)


def validate(data: Any, schema_path: Path, file: Path, *, row: int | None = None, set_defaults: bool = True) -> None:
    """Validate ``data`` against a YAML/JSON schema; raise InputError naming file, row and field."""
    errors = sorted(_validator(schema_path, set_defaults).iter_errors(data), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    err = errors[0]
    fld = ".".join(str(p) for p in err.absolute_path) or None
    where = f"row {row}: " if row is not None else ""
    if err.validator == "required":
        missing = re.findall(r"'([^']+)' is a required property", err.message)
        fld = ".".join([*(str(p) for p in err.absolute_path), *missing]) or None
        raise InputError(f"{where}missing required field", file=file, field=fld)
    if err.validator == "pattern":
        raise InputError(f"{where}invalid value {err.instance!r}", file=file, field=fld,
                         expected="only letters, digits, '_', '.', '-'" if "A-Za-z0-9" in str(err.validator_value) else f"pattern {err.validator_value}")
    raise InputError(f"{where}{err.message}", file=file, field=fld)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_sample_sheet(path: str | Path, schema_dir: Path, *, check_files: bool = True, workdir: Path | None = None) -> pd.DataFrame:
    """Read and validate a sample sheet TSV; returns a DataFrame indexed by sample_id."""
    path = Path(path)
    if not path.is_file():
        raise InputError("sample sheet not found", file=path)
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, comment="#", keep_default_na=False)
    except Exception as exc:  # pandas raises several types for malformed TSV
        raise InputError(f"cannot parse sample sheet: {exc}", file=path) from exc
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in ("sample_id", "patient_id", "xenium_dir", "he_path") if c not in df.columns]
    if missing:
        raise InputError(f"missing column(s) {missing}; found {list(df.columns)}", file=path, field=missing[0],
                         expected="a TSV with columns " + ", ".join(SHEET_COLUMNS))
    unknown = [c for c in df.columns if c not in SHEET_COLUMNS]
    if unknown:
        raise InputError(f"unknown column(s) {unknown}", file=path, field=unknown[0], expected="columns " + ", ".join(SHEET_COLUMNS))
    if df.empty:
        raise InputError("sample sheet has no rows", file=path)
    for col in SHEET_COLUMNS:
        if col not in df.columns:
            df[col] = ""
    df = df.apply(lambda s: s.str.strip())
    schema = schema_dir / "samples.schema.yaml"
    for i, rec in enumerate(df.to_dict("records")):
        row = i + 2  # line number in the file (header is line 1)
        rec = {k: v for k, v in rec.items() if v != ""}
        if "he_mpp" in rec:
            try:
                rec["he_mpp"] = float(rec["he_mpp"])
            except ValueError:
                raise InputError(f"row {row}: he_mpp {rec['he_mpp']!r} is not a number", file=path, field="he_mpp",
                                 expected="µm per pixel, e.g. 0.25") from None
        validate(rec, schema, path, row=row, set_defaults=False)
    dup = df.loc[df["sample_id"].duplicated(keep=False), "sample_id"]
    if len(dup):
        lines = [str(i + 2) for i in dup.index]
        raise InputError(f"duplicate sample_id {sorted(set(dup))} on rows {', '.join(lines)}", file=path, field="sample_id",
                         expected="unique sample ids")
    df["he_mpp"] = pd.to_numeric(df["he_mpp"].replace("", None), errors="coerce")
    if check_files:
        base = workdir or Path.cwd()
        for i, rec in enumerate(df.to_dict("records")):
            for col in PATH_COLUMNS:
                val = rec.get(col) or ""
                if val and not (base / val).exists():
                    raise InputError(f"row {i + 2} (sample {rec['sample_id']}): file not found: {val}", file=path, field=col)
    return df.set_index("sample_id", drop=False)


def read_panel(path: str | Path, schema_dir: Path, mode: str) -> dict[str, Any]:
    """Read a panel YAML (core/addon gene lists)."""
    path = Path(path)
    data = read_yaml(path, "panel YAML") or {}
    if not isinstance(data, dict):
        raise InputError("panel must be a mapping with 'core' and 'addon' lists", file=path)
    validate(data, schema_dir / "panel.schema.yaml", path)
    core = list(data.get("core") or [])
    addon = list(data.get("addon") or [])
    if mode == "yaml":
        for key, genes in (("core", core), ("addon", addon)):
            if not genes:
                raise InputError(f"'{key}' gene list is empty", file=path, field=key, expected="at least one gene (or panels.mode: hvg)")
    for key, genes in (("core", core), ("addon", addon)):
        dups = sorted({g for g in genes if genes.count(g) > 1})
        if dups:
            raise InputError(f"duplicate genes {dups}", file=path, field=key)
    both = sorted(set(core) & set(addon))
    if both:
        raise InputError(f"genes in both core and addon: {both}", file=path, field="addon", expected="disjoint lists")
    return {"mode": mode, "core": core, "addon": addon}


def load_cohorts(config: dict[str, Any], schema_dir: str | Path, *, workdir: str | Path | None = None,
                 config_file: str | Path = "config/config.yaml") -> dict[str, Cohort]:
    """Validate ``config`` (in place: schema defaults are filled) and load every cohort it names."""
    schema_dir = Path(schema_dir)
    workdir = Path(workdir) if workdir is not None else Path.cwd()
    validate(config, schema_dir / "config.schema.yaml", Path(config_file))
    base = {k: config[k] for k in SECTIONS if k in config}
    cohorts: dict[str, Cohort] = {}
    for name, cpath in config["cohorts"].items():
        cfile = workdir / cpath
        cdata = read_yaml(cfile, f"cohort '{name}' YAML (config cohorts.{name})") or {}
        if not isinstance(cdata, dict):
            raise InputError("cohort YAML must be a mapping", file=cfile)
        validate(cdata, schema_dir / "cohort.schema.yaml", cfile, set_defaults=False)
        overrides = {k: v for k, v in cdata.items() if k in SECTIONS}
        unknown = [k for k in cdata if k not in SECTIONS and k not in ("samples", "panel", "simulate", "description")]
        if unknown:
            raise InputError(f"unknown key(s) {unknown}", file=cfile, field=unknown[0],
                             expected="samples, panel, simulate, description or a config section " + ", ".join(SECTIONS))
        merged = deep_merge(base, overrides)
        # re-validate the merged sections so cohort overrides obey the same schema
        validate({"cohorts": {name: str(cpath)}, **merged}, schema_dir / "config.schema.yaml", cfile)
        simulate = cdata.get("simulate")
        samples = read_sample_sheet(workdir / cdata["samples"], schema_dir, check_files=simulate is None, workdir=workdir)
        mode = merged.get("panels", {}).get("mode", "yaml")
        panel = read_panel(workdir / cdata["panel"], schema_dir, mode)
        for enc, ecfg in (merged.get("encoders") or {}).items():
            w = (ecfg or {}).get("weights")
            if w and not (workdir / w).exists():
                raise InputError(f"weights file not found: {w}", file=cfile if enc in (overrides.get("encoders") or {}) else config_file,
                                 field=f"encoders.{enc}.weights", expected="a local file or directory (nothing is downloaded)")
        cohorts[name] = Cohort(name=name, path=cfile, config=merged, samples=samples, panel=panel,
                               simulate=simulate, sheet_path=workdir / cdata["samples"])
    return cohorts


def load_settings(path: str | Path) -> dict[str, dict[str, Any]]:
    """Model settings (config/experiments/table_a1.yaml): name -> setting fields."""
    path = Path(path)
    data = read_yaml(path, "settings file") or {}
    settings = data.get("settings", data) if isinstance(data, dict) else None
    if not isinstance(settings, dict) or not settings:
        raise InputError("expected a mapping 'settings: {name: {...}}'", file=path, field="settings")
    for name in settings:
        if not NAME_RE.match(str(name)):
            raise InputError(f"invalid setting name {name!r}", file=path, field=f"settings.{name}",
                             expected="only letters, digits, '_', '.', '-'")
    return {str(k): dict(v or {}) for k, v in settings.items()}


def setting_status(setting: Mapping[str, Any], encoders_cfg: Mapping[str, Any] | None) -> str | None:
    """None when the setting can run with this config, else the reason it cannot."""
    encoders_cfg = encoders_cfg or {}
    missing = [e for e in setting.get("requires_weights") or [] if not (encoders_cfg.get(e) or {}).get("weights")]
    if missing:
        return "missing weights: " + ", ".join(f"{e} (set encoders.{e}.weights)" for e in missing)
    return None
