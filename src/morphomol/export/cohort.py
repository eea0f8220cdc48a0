"""``morphomol export WHAT``: every requested sample of a cohort, written where it can be, skipped where not.

:func:`export_samples` runs one exporter over finished samples. A sample the format cannot hold (an
AnnData-only sample of a cells cohort for ``qupath`` / ``spatialdata``, a sample without registration
for ``explorer``, without features for ``features``) raises
:class:`~morphomol.export.sample.NotExportable`: it is skipped with its reason and the others are still
written. What a written sample leaves out (tissue contours where detection is meaningless, regions
Explorer cannot take) are its notes. The per-sample outcome is returned and written as
``export_report.tsv`` (sample, status, file, reason / notes) next to the exported files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from morphomol.errors import InputError
from morphomol.export.sample import FinishedSample, NotExportable
from morphomol.util.atomic import atomic_path
from morphomol.util.logs import get_logger

log = get_logger("export")

KINDS = ("spatialdata", "qupath", "explorer", "features")
EXTENSIONS = {"spatialdata": ".zarr", "qupath": ".geojson", "explorer": "_he_imagealignment.csv", "features": ".h5"}
REPORT = "export_report.tsv"


@dataclass
class SampleExport:
    """The outcome of one sample: ``written`` (``file``, ``notes``: what was left out and why) or
    ``skipped`` (``reason``)."""

    sample: str
    status: str
    file: str = ""
    reason: str = ""
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        if self.status == "skipped":
            return f"{self.sample}: skipped: {self.reason}"
        return f"{self.sample}: {self.file}" + (f" ({'; '.join(self.notes)})" if self.notes else "")


def export_one(what: str, fs: FinishedSample, out: Path, notes: list[str], **opts: Any) -> None:
    """Run the ``what`` exporter on one sample (options of the ``export`` verb in ``opts``)."""
    if what == "spatialdata":
        from morphomol.export.spatialdata import export_spatialdata

        export_spatialdata(fs, out, he_level=int(opts.get("he_level", 0)),
                           transcripts=bool(opts.get("transcripts", True)), qv_min=opts.get("qv_min"), notes=notes)
    elif what == "qupath":
        from morphomol.export.qupath import export_qupath

        export_qupath(fs, out, genes=opts.get("genes") or (), tissue=bool(opts.get("tissue", True)), notes=notes)
    elif what == "explorer":
        from morphomol.export.explorer import export_explorer

        export_explorer(fs, out, notes=notes)
    elif what == "features":
        from morphomol.export.features import export_features_h5

        export_features_h5(fs, str(opts["encoder"]), out, notes=notes)
    else:
        raise InputError(f"unknown export {what!r}", field="what", expected=" | ".join(KINDS))


def export_samples(what: str, samples: Sequence[FinishedSample], out_for: Callable[[FinishedSample], Path], *,
                   report_dir: Path | None = None, echo: Callable[[str], None] | None = None,
                   **opts: Any) -> list[SampleExport]:
    """Export every sample it can (``out_for(fs)``: its output path); returns one :class:`SampleExport`
    per sample, in order, and writes them to ``report_dir / export_report.tsv`` when given."""
    from morphomol.util.progress import progress

    done: list[SampleExport] = []
    for fs in progress(list(samples), desc=f"export {what}", unit="sample"):
        out = out_for(fs)
        notes: list[str] = []
        try:
            export_one(what, fs, out, notes, **opts)
        except NotExportable as exc:
            rec = SampleExport(fs.sample, "skipped", reason=exc.message)
            if echo is None:
                log.warning("%s: skipped: %s", fs.sample, exc.message)
        else:
            rec = SampleExport(fs.sample, "written", file=str(out), notes=notes)
        done.append(rec)
        if echo is not None:
            echo(rec.line())
    if report_dir is not None and done:
        write_report(done, Path(report_dir) / REPORT)
    return done


def write_report(done: Sequence[SampleExport], path: Path) -> Path:
    """``sample  status  file  reason`` (tab-separated, one row per sample; reason = the skip's reason or
    the written sample's notes joined by ``; ``)."""
    import pandas as pd

    df = pd.DataFrame([{"sample": d.sample, "status": d.status, "file": d.file,
                        "reason": d.reason if d.status == "skipped" else "; ".join(d.notes)} for d in done],
                      columns=["sample", "status", "file", "reason"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False)
    return path


def summary(what: str, done: Sequence[SampleExport], report: Path | None = None) -> str:
    """One line: how many written, and which samples were skipped (their reasons are on their own lines and
    in the report)."""
    written = [d for d in done if d.status == "written"]
    skipped = [d.sample for d in done if d.status == "skipped"]
    text = f"export {what}: {len(written)} of {len(done)} samples written"
    if skipped:
        names = ", ".join(skipped[:20]) + (f" and {len(skipped) - 20} more" if len(skipped) > 20 else "")
        text += f"; {len(skipped)} skipped ({names})"
    if report is not None:
        text += f"; per sample: {report}"
    return text


__all__ = ["EXTENSIONS", "KINDS", "REPORT", "SampleExport", "export_one", "export_samples", "summary", "write_report"]
