"""Studies: what runs on a cohort. A study = its rules (``workflow/rules/<study>.smk``), its library
subpackage (``morphomol.studies.<study>``), its settings file and its tables.

The registry below is torch-free (it is consulted while Snakemake builds the DAG): a
:class:`StudySpec` names the cohort kinds the study runs on and a ``check`` callable that
validates a cohort for the study before any job runs (settings file, encoders, genes...).
Built-in studies register themselves from their ``study`` module, imported here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from morphomol.errors import InputError


@dataclass(frozen=True)
class StudySpec:
    name: str
    description: str
    cohort_kinds: tuple[str, ...]
    #: ``check(cohort, workdir=..., config_file=..., preflight=...)``: raise InputError for anything wrong with the
    #: cohort; ``preflight=False`` (inside a cluster job, whose main process already checked) skips reading the
    #: samples' input files
    check: Callable[..., None] = lambda cohort, **_: None
    #: settings schema (file name in workflow/schemas), None when the study has no settings file
    settings_schema: str | None = None
    #: ``summary(cohort, workdir=...) -> StudySummary``: what the study will train on the cohort (for
    #: ``morphomol check-config``), with a warning for each part that trains nothing (a missing weight)
    summary: Callable[..., StudySummary] | None = None


@dataclass(frozen=True)
class StudySummary:
    """What a study will train on a cohort: one summary fragment (``spots: 3/10 settings runnable``) and a
    warning for each silent no-op (e.g. no head trained because ``encoders.uni2h.weights`` is not set)."""

    line: str
    warnings: tuple[str, ...] = ()


#: the logger of the no-op warnings: logged by the studies' checks (the Snakemake process at the start of a
#: run, ``snakemake -n``); ``morphomol check-config`` silences it and prints them in its summary instead
NOOP_LOGGER = "morphomol.noop"


def log_noop(summary: StudySummary) -> None:
    """Log each warning of ``summary`` (a study's check calls it when its pre-flight runs); where no logging is
    set up (the Snakemake process building the DAG) each is written to stderr as ``WARNING: ...``."""
    import logging
    import sys

    logger = logging.getLogger(NOOP_LOGGER)
    for w in summary.warnings:
        if logger.hasHandlers() or logger.disabled:
            logger.warning("%s", w)
        else:
            print(f"WARNING: {w}", file=sys.stderr)


_STUDIES: dict[str, StudySpec] = {}
#: modules whose import registers a built-in study (``morphomol.studies.<name>.study``)
BUILTIN = ("fusion", "spots", "cells", "slides")
_loaded = False


def register_study(spec: StudySpec) -> StudySpec:
    if spec.name in _STUDIES:
        raise ValueError(f"study {spec.name!r} is already registered")
    _STUDIES[spec.name] = spec
    return spec


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for name in BUILTIN:
            importlib.import_module(f"morphomol.studies.{name}.study")


def get_study(name: str, *, file: str | Path | None = None) -> StudySpec:
    _load_builtin()
    try:
        return _STUDIES[name]
    except KeyError:
        raise InputError(f"unknown study {name!r}", file=file, field="studies",
                         expected="one of " + ", ".join(sorted(_STUDIES))) from None


def list_studies() -> list[StudySpec]:
    _load_builtin()
    return [_STUDIES[k] for k in sorted(_STUDIES)]


def studies_for_kind(kind: str) -> list[str]:
    return [s.name for s in list_studies() if kind in s.cohort_kinds]


__all__ = ["NOOP_LOGGER", "StudySpec", "StudySummary", "get_study", "list_studies", "log_noop", "register_study",
           "studies_for_kind", "Any"]
