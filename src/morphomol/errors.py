"""Errors that explain bad input in one line: which file, which field, what was expected."""

from __future__ import annotations

from pathlib import Path


class MorphomolError(Exception):
    """Base error of the pipeline. The message is meant for the user, verbatim."""

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        field: str | None = None,
        expected: str | None = None,
    ) -> None:
        self.file = str(file) if file is not None else None
        self.field = field
        self.expected = expected
        parts = []
        if self.file:
            parts.append(f"{self.file}")
        if field:
            parts.append(f"field '{field}'")
        prefix = ": ".join([", ".join(parts)]) if parts else ""
        text = f"{prefix}: {message}" if prefix else message
        if expected:
            text += f" (expected {expected})"
        self.message = text
        super().__init__(text)


class InputError(MorphomolError):
    """The user's input (file, sheet, config value) is invalid."""
