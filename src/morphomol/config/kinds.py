"""Cohort kinds: what a cohort's sample sheet holds, and which studies run on it by default.

A cohort YAML names its ``kind`` (default ``xenium``). The kind fixes the sample-sheet schema
(``workflow/schemas/samples.<kind>.schema.yaml``), which columns are paths (checked to exist
and declared as rule inputs), which are numbers, and the studies run when the cohort does not
list its own. A new input modality is one :func:`register_kind` call (torch-free: this runs when
Snakemake builds the DAG).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from morphomol.errors import InputError


@dataclass(frozen=True)
class CohortKind:
    name: str
    description: str
    required: tuple[str, ...]          # sheet columns that must be present
    columns: tuple[str, ...]           # every allowed column (required first)
    path_columns: tuple[str, ...]      # columns holding paths (resolved against the working directory)
    dir_columns: tuple[str, ...] = ()  # path columns that name a directory (the others name files)
    numeric_columns: tuple[str, ...] = ()
    studies: tuple[str, ...] = ()      # default studies of a cohort of this kind
    needs_panel: bool = False          # the cohort YAML must name a panel
    #: (sheet DataFrame, sheet=, workdir=, simulated=) -> DataFrame with defaults / discovered paths filled
    resolve: Callable[..., Any] | None = None

    @property
    def sheet_schema(self) -> str:
        return f"samples.{self.name}.schema.yaml"


_KINDS: dict[str, CohortKind] = {}


def register_kind(kind: CohortKind) -> CohortKind:
    if kind.name in _KINDS:
        raise ValueError(f"cohort kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def get_kind(name: str, *, file: object = None) -> CohortKind:
    from morphomol.studies import list_studies

    list_studies()  # the studies register the cohort kinds they bring
    try:
        return _KINDS[name]
    except KeyError:
        raise InputError(f"unknown cohort kind {name!r}", file=file, field="kind",
                         expected="one of " + ", ".join(sorted(_KINDS))) from None


def kinds() -> dict[str, CohortKind]:
    from morphomol.studies import list_studies

    list_studies()
    return dict(_KINDS)


def _resolve_xenium(df: Any, **kw: Any) -> Any:
    from morphomol.io.sheets import resolve_xenium_sheet

    return resolve_xenium_sheet(df, **kw)


register_kind(CohortKind(
    name="xenium",
    description="10x Xenium bundles with their H&E, SpatialData zarrs or HEST-1k Xenium samples (fusion study)",
    required=("sample_id", "patient_id"),
    columns=("sample_id", "patient_id", "xenium_dir", "he_path", "he_mpp", "alignment", "regions", "format", "sdata",
             "sdata_image", "hest_dir", "hest_id"),
    path_columns=("xenium_dir", "he_path", "alignment", "regions", "sdata", "hest_dir"),
    dir_columns=("xenium_dir", "sdata", "hest_dir"),
    numeric_columns=("he_mpp",),
    studies=("fusion",),
    needs_panel=True,
    resolve=_resolve_xenium,
))
