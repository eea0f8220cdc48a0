"""JSON files: the one sanitiser (NaN/inf -> null, NumPy scalars -> Python, tuples -> lists,
anything else -> ``str``) and atomic writes."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from morphomol.errors import InputError
from morphomol.util.atomic import atomic_path


def json_safe(obj: Any) -> Any:
    """A JSON-serialisable copy of ``obj``: non-finite floats become None, NumPy scalars and arrays
    Python values, mappings get string keys, dataclass-like objects with ``to_dict`` are converted,
    anything else unknown becomes its ``str``."""
    import numpy as np

    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return json_safe(float(obj))
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: json_safe(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        return json_safe(to_dict())
    return getattr(obj, "__name__", None) or str(obj)


def dumps(obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> str:
    return json.dumps(json_safe(obj), indent=indent, sort_keys=sort_keys, allow_nan=False)


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Atomic JSON write (temp file + rename); NaN/inf become null."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")
    return path


def read_json(path: str | Path, what: str = "JSON file", *, expected: str | None = None, field: str | None = None,
              obj: bool = False) -> Any:
    """Parse a JSON file (a JSON object when ``obj``); one InputError naming the file (and ``field`` /
    ``expected`` when given) when it is missing, unreadable or malformed. The one JSON reader of user
    and pipeline files."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{what} not found", file=p, field=field, expected=expected) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {what} ({exc})", file=p, field=field, expected=expected) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc.msg} at line {exc.lineno})", file=p, field=field,
                         expected=expected or what) from None
    if obj and not isinstance(doc, dict):
        raise InputError("not a JSON object", file=p, field=field, expected=expected or f"{what} (a JSON object)")
    return doc
