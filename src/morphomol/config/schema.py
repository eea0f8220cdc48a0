"""JSON-schema validation with defaults, and YAML reading: every problem is one InputError
naming the file (and row, for sample sheets) and the field."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import yaml

from morphomol.errors import InputError

#: Where the schemas live: ``workflow/schemas`` of the repository (the workflow side owns them).
SCHEMA_DIR = Path(__file__).resolve().parents[3] / "workflow" / "schemas"


def read_yaml(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found" + (" (it is a directory)" if path.is_dir() else ""), file=path)
    try:
        with open(path) as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise InputError(f"not valid YAML: {exc}", file=path) from exc


@functools.lru_cache(maxsize=None)
def _schema(path: str) -> dict[str, Any]:
    with open(path) as fh:
        return yaml.safe_load(fh)


def _registry() -> Any:
    """Resolves ``$ref: "<file>.schema.yaml"`` to the schema files of :data:`SCHEMA_DIR` (each study's
    config section lives in its own ``study.<name>.schema.yaml``)."""
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    def retrieve(uri: str) -> Any:
        path = SCHEMA_DIR / uri
        if not path.is_file():
            raise FileNotFoundError(f"schema {uri} not found in {SCHEMA_DIR}")
        # without its own "$schema", the referenced file is validated by *this* (defaults-filling) validator
        contents = {k: v for k, v in _schema(str(path)).items() if k != "$schema"}
        return Resource.from_contents(contents, default_specification=DRAFT202012)

    return Registry(retrieve=retrieve)


def _validator(schema_path: Path, set_defaults: bool) -> Any:
    import jsonschema

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
    return cls(_schema(str(schema_path)), registry=_registry())


def _path_of(err: Any) -> str:
    return ".".join(str(p) for p in err.absolute_path)


def validate(data: Any, schema: str | Path, file: str | Path | None, *, row: int | None = None,
             set_defaults: bool = True, prefix: str = "") -> None:
    """Validate ``data`` against a YAML/JSON schema (a path, or a file name in :data:`SCHEMA_DIR`);
    fill schema defaults in place; raise one InputError naming file, row and field."""
    schema_path = Path(schema)
    if not schema_path.is_absolute() and not schema_path.exists():
        schema_path = SCHEMA_DIR / schema_path
    errors = sorted(_validator(schema_path, set_defaults).iter_errors(data), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    # report the deepest problem first (an unknown key beats "does not match any of ...")
    err = errors[0]
    where = f"row {row}: " if row is not None else ""

    def fld(path: str) -> str | None:
        full = ".".join(p for p in (prefix, path) if p)
        return full or None

    if err.validator == "required":
        missing = re.findall(r"'([^']+)' is a required property", err.message)
        name = ".".join(p for p in (_path_of(err), *missing) if p)
        raise InputError(f"{where}missing required field", file=file, field=fld(name))
    if err.validator == "additionalProperties":
        extra = re.findall(r"'([^']+)'", err.message.split("(")[-1]) or []
        known = sorted((err.schema.get("properties") or {}).keys())
        base = _path_of(err)
        name = ".".join(p for p in (base, extra[0] if extra else "") if p)
        raise InputError(f"{where}unknown key '{extra[0] if extra else '?'}'", file=file, field=fld(name),
                         expected=("one of " + ", ".join(known)) if known else "no other keys")
    if err.validator == "pattern":
        pat = str(err.validator_value)
        expected = ("letters, digits, '_', '.', '-', not starting with '.'" if "A-Za-z0-9" in pat
                    else f"pattern {pat}")
        raise InputError(f"{where}invalid value {err.instance!r}", file=file, field=fld(_path_of(err)), expected=expected)
    if err.validator == "propertyNames":
        raise InputError(f"{where}invalid name {err.instance!r}", file=file, field=fld(_path_of(err)),
                         expected="letters, digits, '_', '.', '-', not starting with '.'")
    raise InputError(f"{where}{err.message}", file=file, field=fld(_path_of(err)))


def schema_defaults(schema: str | Path, **required: Any) -> dict[str, Any]:
    """The defaults a schema fills into ``required`` (a minimal valid document)."""
    data = copy.deepcopy(dict(required))
    validate(data, schema, None)
    return data


#: mappings an override replaces as a whole instead of merging into (dotted paths from the config root): a
#: user's task schedule lists exactly the tasks to train, the defaults are not merged back into it
REPLACED = frozenset({"cells.tasks"})


def deep_merge(base: dict[str, Any], override: dict[str, Any], _path: str = "") -> dict[str, Any]:
    """``override`` merged into ``base`` (mappings recursively, except the :data:`REPLACED` ones)."""
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        path = f"{_path}.{k}" if _path else str(k)
        if isinstance(v, dict) and isinstance(out.get(k), dict) and path not in REPLACED:
            out[k] = deep_merge(out[k], v, path)
        else:
            out[k] = copy.deepcopy(v)
    return out
