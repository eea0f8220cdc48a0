"""Cell-type labels: the label-mapping YAML that normalises label strings, and free-text parsing.

The YAML maps each canonical label to the strings that mean it in the data (aliases)::

    T cell CD4: [CD4+ T, "CD4 T cells", T_CD4]
    B cell: [B, "CD19+ B"]
    _drop: [Unassigned, Doublet]        # optional: cells with these labels are removed

Matching is case-insensitive and ignores repeated whitespace. A label that is neither canonical nor an
alias is an error listing every unknown label (with counts). The same map turns the model's free-text
answers back into canonical labels (:meth:`LabelMap.parse`). Torch-free.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from morphomol.errors import InputError

DROP_KEY = "_drop"
_SPACE = re.compile(r"\s+")
_EDGE_PUNCT = re.compile(r"^[\s\"'`.,;:!?]+|[\s\"'`.,;:!?]+$")


def label_key(text: str) -> str:
    """Matching key of a label string: case-folded, whitespace collapsed, edge punctuation removed."""
    return _EDGE_PUNCT.sub("", _SPACE.sub(" ", str(text)).strip()).casefold()


@dataclass(frozen=True)
class LabelMap:
    """Canonical labels (sorted) and the key -> canonical label lookup (``None``: drop the cell)."""

    labels: tuple[str, ...]
    lookup: dict[str, str | None]
    path: Path | None = None

    @classmethod
    def read(cls, path: str | Path) -> LabelMap:
        """Read and validate the mapping YAML (InputError naming the file and the offending key)."""
        from morphomol.config.schema import read_yaml

        path = Path(path)
        data = read_yaml(path, "label-mapping YAML")
        if not isinstance(data, dict) or not data:
            raise InputError("label map must be a non-empty mapping", file=path,
                             expected="canonical label -> list of aliases")
        lookup: dict[str, str | None] = {}
        labels = []
        for canon, aliases in data.items():
            canon = str(canon)
            if aliases is None:
                aliases = []
            if isinstance(aliases, str):
                aliases = [aliases]
            if not isinstance(aliases, list):
                raise InputError(f"aliases of {canon!r} are not a list", file=path, field=canon,
                                 expected="a list of strings")
            target = None if canon == DROP_KEY else canon
            if target is not None:
                labels.append(canon)
            names = ([] if target is None else [canon]) + [str(a) for a in aliases]
            for name in names:
                k = label_key(name)
                if not k:
                    raise InputError(f"empty label under {canon!r}", file=path, field=canon)
                if k in lookup and lookup[k] != target:
                    raise InputError(f"{name!r} maps to both {lookup[k]!r} and {target!r}", file=path, field=canon,
                                     expected="every alias under one canonical label")
                lookup[k] = target
        if len(labels) < 2:
            raise InputError(f"{len(labels)} canonical label(s)", file=path, expected="at least two cell types")
        return cls(labels=tuple(sorted(labels)), lookup=lookup, path=path)

    def normalise(self, values: Sequence[object], *, file: str | Path | None = None,
                  field: str = "label") -> list[str | None]:
        """Canonical label per value (None for cells to drop); InputError listing unknown labels."""
        out: list[str | None] = []
        unknown: Counter[str] = Counter()
        missing = 0
        for v in values:
            if v is None or (isinstance(v, float) and v != v) or str(v).strip() == "":
                missing += 1
                out.append(None)
                continue
            k = label_key(str(v))
            if k not in self.lookup:
                unknown[str(v)] += 1
                out.append(None)
                continue
            out.append(self.lookup[k])
        if unknown:
            listed = ", ".join(f"{k!r} ({n} cells)" for k, n in sorted(unknown.items()))
            raise InputError(f"{len(unknown)} label(s) not in the label map {self.path}: {listed}", file=file,
                             field=field, expected="every label as a canonical label or alias of cells.label_map")
        if missing:
            raise InputError(f"{missing} cell(s) without a label", file=file, field=field,
                             expected="a label for every cell (map unwanted ones under _drop)")
        return out

    def parse(self, text: str) -> str | None:
        """The canonical label a free-text answer names (exact key, else the longest label/alias it starts
        with); None when it names none (counted as wrong)."""
        k = label_key(text)
        if k in self.lookup:
            return self.lookup[k]
        best: tuple[int, str | None] = (0, None)
        for alias, canon in self.lookup.items():
            if canon is not None and k.startswith(alias) and len(alias) > best[0]:
                rest = k[len(alias):]
                if not rest or not rest[0].isalnum():
                    best = (len(alias), canon)
        return best[1]

    def words(self) -> list[str]:
        """Whitespace-separated words of the canonical labels (a word-level vocabulary needs them)."""
        return sorted({w for lab in self.labels for w in lab.split()})


def check_labels(found: Iterable[str], labels: Sequence[str], *, what: str, file: str | Path | None = None) -> None:
    """InputError when labels of ``found`` are not among ``labels`` (e.g. test labels unseen in training)."""
    extra = sorted(set(found) - set(labels))
    if extra:
        raise InputError(f"{what}: label(s) {extra} not among {list(labels)}", file=file, field="label")
