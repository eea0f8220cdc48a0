"""The one rule for names that become path components (cohorts, samples, patients, settings, encoders).

``[A-Za-z0-9_-][A-Za-z0-9_.-]*``: no ``.``, ``..``, hidden names, separators or empty names, the same
pattern the sheet schemas and the wildcard constraints use. A name given on the command line is checked
here before it is joined to any path.
"""

from __future__ import annotations

import re
from pathlib import Path

from morphomol.errors import InputError

NAME_PATTERN = r"[A-Za-z0-9_-][A-Za-z0-9_.-]*"
_NAME_RE = re.compile(rf"^{NAME_PATTERN}$")


def is_name(value: object) -> bool:
    return isinstance(value, str) and _NAME_RE.fullmatch(value) is not None


def check_name(value: object, field: str, *, file: str | Path | None = None) -> str:
    """``value`` if it is a plain name, else one InputError naming ``field``."""
    if not is_name(value):
        raise InputError(f"{value!r} is not a plain name", file=file, field=field,
                         expected=f"a name matching {NAME_PATTERN} (letters, digits, '_', '-', '.'; "
                                  "not '.', '..', a hidden name or a path)")
    return str(value)


__all__ = ["NAME_PATTERN", "is_name", "check_name"]
