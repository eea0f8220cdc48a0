"""Table files: CSV, GitHub Markdown and LaTeX (booktabs) with escaping, and the cell formats.

A table is a DataFrame plus a list of :class:`Column` (key, header, metric, alignment). Metric
columns are bold where the row's ``{metric}_best`` is true (:func:`mark_best`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.eval.metrics import HIGHER_IS_BETTER
from morphomol.util.atomic import atomic_path

_NONE_VALUES = {"", "-", "none", "null", "nan"}
_MD_ESCAPE = re.compile(r"([\\`*_\[\]|<>#])")
_TEX_ESCAPE = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "↑": r"$\uparrow$",
    "↓": r"$\downarrow$", "<": r"\textless{}", ">": r"\textgreater{}",
}
_TEX_RE = re.compile("|".join(re.escape(k) for k in _TEX_ESCAPE))


# ------------------------------------------------------------------------------ cell formats


def norm_none(value: Any) -> Any:
    """None for the many spellings of 'not applicable' (None, NaN, '', '-', 'none', 'null', 'nan')."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str) and value.strip().lower() in _NONE_VALUES:
        return None
    return value


def fmt_field(value: Any) -> str:
    """A descriptive cell: '-' for not applicable, yes/no for booleans, lists comma-joined."""
    value = norm_none(value)
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "-"
    return str(value)


def fmt_mean_std(mean: float, std: float, n: int | float, digits: int = 3) -> str:
    """``0.820 ± 0.016``; ``0.820 (n=1)`` without a std; ``n/a`` without a mean."""
    if not np.isfinite(mean):
        return "n/a"
    if not np.isfinite(std) or n < 2:
        return f"{mean:.{digits}f} (n={int(n)})"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def mark_best(df: pd.DataFrame, metrics: Sequence[str], eligible: pd.Series | None = None,
              higher_is_better: Mapping[str, bool] = HIGHER_IS_BETTER) -> None:
    """Add ``{metric}_best`` columns (in place): the rows whose ``{metric}_mean`` is the best of the
    ``eligible`` rows (ties within 1e-12 all marked)."""
    for metric in metrics:
        col = df[f"{metric}_mean"].astype(float)
        if eligible is not None:
            col = col.where(eligible)
        best = np.zeros(len(df), dtype=bool)
        if col.notna().any():
            target = col.max() if higher_is_better[metric] else col.min()
            best = np.isclose(col.to_numpy(), target, rtol=0, atol=1e-12) & col.notna().to_numpy()
        df[f"{metric}_best"] = best


# ------------------------------------------------------------------------------ escaping


def md_escape(text: Any) -> str:
    """Escape Markdown control characters (underscores, pipes, asterisks ...) of a cell."""
    s = str(text).replace("\n", " ")
    return _MD_ESCAPE.sub(r"\\\1", s)


def tex_escape(text: Any) -> str:
    """Escape LaTeX special characters of a cell (``_`` → ``\\_``, ``±`` → ``$\\pm$`` ...)."""
    return _TEX_RE.sub(lambda m: _TEX_ESCAPE[m.group(0)], str(text).replace("\n", " "))


# ------------------------------------------------------------------------------ rendering


@dataclass
class Column:
    """One rendered column: DataFrame ``key``, ``header`` text, ``metric`` (bold when the row is best), align l|r."""

    key: str
    header: str
    metric: str | None = None
    align: str = "l"


def _cell(row: Mapping[str, Any] | pd.Series, key: str) -> str:
    value = row.get(key, "")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def render_markdown(df: pd.DataFrame, columns: Sequence[Column], *, title: str | None = None,
                    notes: Sequence[str] = ()) -> str:
    """GitHub Markdown table; best metric cells (``{metric}_best``) in bold."""
    lines = []
    if title:
        lines += [f"## {md_escape(title)}", ""]
    lines.append("| " + " | ".join(md_escape(c.header) for c in columns) + " |")
    lines.append("|" + "|".join(":---" if c.align == "l" else "---:" for c in columns) + "|")
    for _, row in df.iterrows():
        cells = []
        for c in columns:
            text = md_escape(_cell(row, c.key))
            if c.metric and bool(row.get(f"{c.metric}_best", False)) and text:
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines.append("")
        lines += [md_escape(n) for n in notes]
    return "\n".join(lines) + "\n"


def _tex_metric(text: str, bold: bool) -> str:
    m = re.fullmatch(r"(-?[0-9.]+) ± ([0-9.]+)", text)
    if m:
        inner = f"{m.group(1)} \\pm {m.group(2)}"
        return f"$\\mathbf{{{inner}}}$" if bold else f"${inner}$"
    esc = tex_escape(text)
    return f"\\textbf{{{esc}}}" if bold else esc


def render_latex(df: pd.DataFrame, columns: Sequence[Column], *, caption: str | None = None,
                 label: str | None = None, notes: Sequence[str] = ()) -> str:
    """A ``table`` + ``tabular`` (booktabs rules) with escaped cells; best metric cells bold."""
    spec = "".join(c.align for c in columns)
    lines = ["% requires \\usepackage{booktabs}", "\\begin{table}[htbp]", "\\centering", "\\small"]
    if caption:
        lines.append(f"\\caption{{{tex_escape(caption)}}}")
    if label:
        lines.append(f"\\label{{{label}}}")
    lines += [f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
              " & ".join(tex_escape(c.header) for c in columns) + " \\\\", "\\midrule"]
    for _, row in df.iterrows():
        cells = []
        for c in columns:
            text = _cell(row, c.key)
            if c.metric:
                cells.append(_tex_metric(text, bool(row.get(f"{c.metric}_best", False))))
            else:
                cells.append(tex_escape(text))
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    for n in notes:
        lines.append(f"\\par\\footnotesize {tex_escape(n)}")
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ files


def write_text(path: str | Path, text: str) -> Path:
    """Atomic text file write."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return path


def write_csv(path: str | Path, df: pd.DataFrame) -> Path:
    """Atomic CSV write (no index, floats with 8 significant digits)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.8g")
    return path


def write_table(df: pd.DataFrame, columns: Sequence[Column], stem: str | Path, *, title: str,
                label: str, notes: Sequence[str] = ()) -> list[Path]:
    """Write ``{stem}.csv`` (all columns), ``{stem}.md`` and ``{stem}.tex``; returns the three paths."""
    stem = Path(stem)
    paths = [stem.with_suffix(".csv"), stem.with_suffix(".md"), stem.with_suffix(".tex")]
    write_csv(paths[0], df)
    write_text(paths[1], render_markdown(df, columns, title=title, notes=notes))
    write_text(paths[2], render_latex(df, columns, caption=title, label=label, notes=notes))
    return paths
