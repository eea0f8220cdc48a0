"""Cohort kinds: what a cohort's sample sheet holds, and which studies run on it by default.

A cohort YAML names its ``kind`` (default ``xenium``). The kind fixes the sample-sheet schema
(``workflow/schemas/samples.<kind>.schema.yaml``), which columns are paths (checked to exist
and declared as rule inputs), which are numbers, and the studies run when the cohort does not
list its own. A new input modality is one :func:`register_kind` call (torch-free: this runs when
Snakemake builds the DAG).
"""

from __future__ import annotations

from dataclasses import dataclass

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


register_kind(CohortKind(
    name="xenium",
    description="10x Xenium output bundles, each with its H&E slide (fusion study)",
    required=("sample_id", "patient_id", "xenium_dir", "he_path"),
    columns=("sample_id", "patient_id", "xenium_dir", "he_path", "he_mpp", "alignment", "regions"),
    path_columns=("xenium_dir", "he_path", "alignment", "regions"),
    dir_columns=("xenium_dir",),
    numeric_columns=("he_mpp",),
    studies=("fusion",),
    needs_panel=True,
))
