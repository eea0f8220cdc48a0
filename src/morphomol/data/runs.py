"""Run artifacts: the one reader/writer of ``runs/{setting}/fold{k}/metrics.json`` and
``predictions.parquet``.

``metrics.json`` (docs/ARCHITECTURE.md): ``setting, fold, kind (regression | clip), status`` plus,
for ok regression runs, ``mean`` and ``per_gene`` (:func:`morphomol.eval.metrics.regression_report`)
and, for ok CLIP runs, ``recall@1, recall@5, random_recall@1, random_recall@5``. NaN is written as
``null``.

``predictions.parquet``: long table ``tile_id, gene, y, y_hat`` (float32, log1p space), tile-major;
``tile_id`` and ``gene`` are categorical.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError
from morphomol.util.atomic import atomic_path
from morphomol.util.jsonio import read_json, write_json

#: metrics every ok regression run must report in ``mean`` (Table A.1 columns)
REQUIRED_MEAN: tuple[str, ...] = ("spearman", "pearson", "mse")
#: metrics every ok CLIP run must report (Table A.2 columns)
REQUIRED_CLIP: tuple[str, ...] = ("recall@1", "recall@5")
RUN_KINDS: tuple[str, ...] = ("regression", "clip")
PREDICTION_COLUMNS: tuple[str, ...] = ("tile_id", "gene", "y", "y_hat")
_RUN_DIR_RE = re.compile(r"^fold(\d+)$")


# ------------------------------------------------------------------------------ metrics.json


def metrics_file(path: str | Path) -> Path:
    """``path`` itself when it names a ``.json`` file, else ``path/metrics.json`` (a run directory)."""
    p = Path(path)
    return p / "metrics.json" if p.is_dir() or p.suffix != ".json" else p


def write_metrics(path: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Write a run's ``metrics.json`` atomically (indent 2, NaN/inf as null)."""
    return write_json(path, metrics)


def read_metrics(path: str | Path) -> dict[str, Any]:
    """Read and check one ``metrics.json`` (or the one in a run directory); adds ``_file``.

    Checks: a JSON object with ``setting`` and ``fold``; ``kind`` regression or clip; a path
    ``runs/{setting}/fold{k}/`` agrees with the content; ok regression runs have ``mean`` with
    :data:`REQUIRED_MEAN` and an object ``per_gene``; ok CLIP runs have :data:`REQUIRED_CLIP`.
    """
    file = metrics_file(path)
    if not file.exists():
        raise InputError("metrics file not found", file=file, expected="runs/{setting}/fold{k}/metrics.json")
    data = read_json(file, "metrics file", obj=True)
    for field in ("setting", "fold"):
        if field not in data:
            raise InputError("missing field", file=file, field=field)
    kind = data.get("kind", "regression")
    if kind not in RUN_KINDS:
        raise InputError(f"unknown kind {kind!r}", file=file, field="kind", expected="regression or clip")
    # the directory layout runs/{setting}/fold{k} must agree with the file's content
    m = _RUN_DIR_RE.match(file.parent.name)
    if m and file.parent.parent.parent.name == "runs":
        if str(data["setting"]) != file.parent.parent.name:
            raise InputError(f"setting {data['setting']!r} does not match the run directory",
                             file=file, field="setting", expected=repr(file.parent.parent.name))
        if int(data["fold"]) != int(m.group(1)):
            raise InputError(f"fold {data['fold']!r} does not match the run directory",
                             file=file, field="fold", expected=m.group(1))
    status = str(data.get("status", "ok"))
    if status == "ok":
        if kind == "regression":
            mean = data.get("mean")
            if not isinstance(mean, dict):
                raise InputError("missing or not an object", file=file, field="mean",
                                 expected='{"pearson":..., "spearman":..., "mse":..., "mae":...}')
            for metric in REQUIRED_MEAN:
                if metric not in mean:
                    raise InputError("missing metric", file=file, field=f"mean.{metric}")
            if not isinstance(data.get("per_gene", {}), dict):
                raise InputError("not an object", file=file, field="per_gene", expected="{gene: {metric: value}}")
        else:
            for metric in REQUIRED_CLIP:
                if metric not in data:
                    raise InputError("missing metric", file=file, field=metric)
    data["_file"] = str(file)
    return data


def discover_metrics(cohort_dir: str | Path) -> list[Path]:
    """All ``runs/*/fold*/metrics.json`` under a cohort result directory (sorted; for tests and notebooks,
    the pipeline passes explicit paths)."""
    return sorted(Path(cohort_dir).glob("runs/*/fold*/metrics.json"))


# ------------------------------------------------------------------------------ predictions


def predictions_frame(tile_ids: Sequence[str], genes: Sequence[str], y: np.ndarray, y_hat: np.ndarray) -> pd.DataFrame:
    """Long table ``tile_id, gene, y, y_hat`` (log1p space, float32), tile-major."""
    n, g = len(tile_ids), len(genes)
    y = np.asarray(y, dtype=np.float32).reshape(n, g)
    y_hat = np.asarray(y_hat, dtype=np.float32).reshape(n, g)
    return pd.DataFrame({
        "tile_id": pd.Categorical(np.repeat(np.asarray(tile_ids, dtype=object), g)),
        "gene": pd.Categorical(np.tile(np.asarray(genes, dtype=object), n), categories=list(genes)),
        "y": y.reshape(-1),
        "y_hat": y_hat.reshape(-1),
    })


def write_predictions(path: str | Path, tile_ids: Sequence[str], genes: Sequence[str], y: np.ndarray,
                      y_hat: np.ndarray) -> Path:
    """Write ``predictions.parquet`` atomically (:func:`predictions_frame`)."""
    df = predictions_frame(tile_ids, genes, y, y_hat)
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return path


def read_predictions(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Concatenated ``tile_id, gene, y, y_hat`` of several ``predictions.parquet`` (empty frame for none)."""
    parts = []
    for p in paths:
        try:
            d = pd.read_parquet(p, columns=list(PREDICTION_COLUMNS))
        except Exception as exc:
            raise InputError(f"cannot read predictions ({exc})", file=p,
                             expected="columns tile_id, gene, y, y_hat") from None
        parts.append(d)
    if not parts:
        return pd.DataFrame(columns=list(PREDICTION_COLUMNS))
    return pd.concat(parts, ignore_index=True)
