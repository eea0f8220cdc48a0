"""Sentence embeddings of the cohort's captions (rule ``spots_text``, one job per cohort).

Reads each sample's unit table and its captions (the sheet's CSV, or the cached VLM table), embeds the
distinct captions once with a local sentence-transformers directory (offline; L2-normalised), and writes

* ``text/captions.parquet``: ``unit_id, sample_id, barcode, caption, source`` (spots with a caption);
* ``text/embeddings.zarr``: ``embeddings`` (N, D) float32, row ``i`` = row ``i`` of captions.parquet;
  attrs ``model``, ``model_sha256``, ``dim``, ``n``, ``unique``, ``seconds``, ``captions_per_second``.

Spots without a caption have no row: the alignment loss uses matched pairs only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.errors import InputError
from morphomol.studies.spots.captions import offline, read_caption_table, read_captions_csv
from morphomol.util.atomic import atomic_path
from morphomol.util.logs import get_logger

log = get_logger("spots.text")


def load_sentence_model(model_dir: str | Path, device: str = "cpu") -> Any:
    """A SentenceTransformer from a checked local directory (nothing downloaded)."""
    from morphomol.studies.spots.layout import check_sentence_model_dir

    offline()
    d = check_sentence_model_dir(Path(model_dir))
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(str(d), device=device, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot load the sentence model ({type(exc).__name__}: {exc})", file=d,
                         field="spots.captions.sentence_model", expected="a complete sentence-transformers directory") from None


def embed_texts(model: Any, texts: list[str], batch_size: int) -> np.ndarray:
    """(len(texts), D) float32, L2-normalised."""
    emb = model.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                       show_progress_bar=False)
    return np.asarray(emb, dtype=np.float32)


def collect_captions(units: Mapping[str, str | Path], sources: Mapping[str, tuple[str, str | Path]]) -> pd.DataFrame:
    """``unit_id, sample_id, barcode, caption, source`` of every sample with a caption source
    (``sources``: sample -> ("csv" | "vlm", path))."""
    from morphomol.data.units import read_units

    parts = []
    for sample, upath in units.items():
        if sample not in sources:
            continue
        kind, path = sources[sample]
        a = read_units(upath, backed=True)
        obs = a.obs.copy()
        a.file.close()
        if kind == "csv":
            df = read_captions_csv(path, obs, sample)
        else:
            df, _meta = read_caption_table(path)
            if len(df) != len(obs) or not (df["unit_id"].astype(str).to_numpy() == obs.index.astype(str)).all():
                raise InputError("caption table rows do not match the unit table", file=path, field="unit_id",
                                 expected=f"the units of {upath}")
            df = df[df["caption"].astype(str).str.strip() != ""]
        df.insert(1, "sample_id", sample)
        df["source"] = kind
        parts.append(df)
        log.info("%s: %d captions (%s) for %d units", sample, len(df), kind, len(obs))
    if not parts or sum(len(p) for p in parts) == 0:
        raise InputError("no captions for any sample", field="captions",
                         expected="captions CSVs in the sheet (source csv) or a caption model (source vlm)")
    return pd.concat(parts, ignore_index=True)


def embed_cohort_captions(*, units: Mapping[str, str | Path], sources: Mapping[str, tuple[str, str | Path]],
                          model_dir: str | Path, batch_size: int, out_table: str | Path,
                          out_store: str | Path) -> dict[str, Any]:
    """The ``spots_text`` rule (see the module docstring). Returns the store's attrs."""
    import zarr

    from morphomol.util.hashing import sha256_path

    from morphomol.studies.spots.layout import check_sentence_model_dir

    check_sentence_model_dir(Path(model_dir))  # before reading anything
    table = collect_captions(units, sources)
    uniq, inverse = np.unique(table["caption"].to_numpy(dtype=str), return_inverse=True)
    model = load_sentence_model(model_dir)
    t0 = time.perf_counter()
    emb_u = embed_texts(model, [str(u) for u in uniq], batch_size)
    seconds = time.perf_counter() - t0
    emb = emb_u[inverse]
    attrs = {"model": str(model_dir), "model_sha256": sha256_path(model_dir), "dim": int(emb.shape[1]),
             "n": int(len(emb)), "unique": int(len(uniq)), "seconds": seconds,
             "captions_per_second": len(uniq) / max(seconds, 1e-9), "normalised": True}
    with atomic_path(out_store) as tmp:
        g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        g.create_array("embeddings", shape=emb.shape, chunks=(min(len(emb), 4096), emb.shape[1]), dtype="float32")
        g["embeddings"][:] = emb
        g.attrs.update(attrs)
    with atomic_path(out_table) as tmp:
        table.to_parquet(tmp, index=False)
    log.info("embedded %d captions (%d distinct) in %.1f s (%.1f captions/s), dim %d", len(emb), len(uniq), seconds,
             attrs["captions_per_second"], emb.shape[1])
    return attrs


def read_text(table: str | Path, store: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """(captions table, embeddings) of :func:`embed_cohort_captions`."""
    from morphomol.data.features import open_zarr_group

    df = pd.read_parquet(table)
    emb = np.asarray(open_zarr_group(store)["embeddings"][:], dtype=np.float32)
    if len(df) != len(emb):
        raise InputError(f"{len(df)} captions but {len(emb)} embeddings", file=store, field="embeddings")
    return df, emb
