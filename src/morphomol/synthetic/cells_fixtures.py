"""Small fixtures of the cells study for tests and benchmarks: a fold (table + metadata + label map + image
store) whose cell sentences start with class-specific genes, and a tiny Gemma-3 whose vocabulary covers it.

The classes are easy on purpose (a few fine-tuning steps must move the model); the real learning problem
is the simulated cohort of :mod:`morphomol.synthetic.cells`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphomol.util.jsonio import write_json

TOY_CLASSES: dict[str, list[str]] = {
    "B cell": ["MS4A1", "CD79A", "CD19"],
    "T cell": ["CD3D", "CD3E", "IL7R"],
    "Fibroblast": ["COL1A1", "DCN", "LUM"],
}
TOY_BACKGROUND = ["ACTB", "B2M", "GAPDH", "FTL", "TPT1", "EEF1A1", "MALAT1", "VIM"]


def toy_fold(out_dir: str | Path, *, n_per_class: int = 24, n_donors: int = 4, image_px: int = 32, seed: int = 0,
             n_genes: int = 8) -> dict[str, Any]:
    """Write ``fold.parquet``, ``fold.json``, ``labels.yaml`` and ``images.zarr`` (every cell has a patch whose
    colour depends on its class) under ``out_dir``; returns their paths and the gene list."""
    import zarr

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, imgs = [], []
    colours = {c: np.array(v) for c, v in zip(TOY_CLASSES, ([200, 80, 120], [90, 60, 160], [230, 160, 190]), strict=True)}
    i = 0
    for c, markers in TOY_CLASSES.items():
        for j in range(n_per_class):
            donor = f"D{j % n_donors + 1}"
            mk = list(rng.permutation(markers))
            bg = list(rng.permutation(TOY_BACKGROUND))[: n_genes - len(mk)]
            rows.append({"tile_id": f"toy__{i:06d}", "sample_id": "toy", "patient_id": donor, "index": i, "label": c,
                         "has_image": True, "sentence": " ".join(mk + bg), "n_sentence_genes": n_genes})
            img = np.clip(colours[c][None, None, :] + rng.normal(0, 12, (image_px, image_px, 3)), 0, 255)
            imgs.append(img.astype(np.uint8))
            i += 1
    t = pd.DataFrame(rows)
    part = {f"D{k + 1}": p for k, p in enumerate(["fit"] * max(1, n_donors - 2) + ["val", "test"])}
    t["partition"] = t["patient_id"].map(part)
    t.to_parquet(out / "fold.parquet", index=False)
    genes = sorted({g for m in TOY_CLASSES.values() for g in m} | set(TOY_BACKGROUND))
    write_json(out / "fold.json", {"fold": 0, "values": "counts", "hvg": genes, "n_genes": n_genes,
                                   "labels": sorted(TOY_CLASSES), "fit_labels": sorted(TOY_CLASSES), "unseen_labels": []})
    (out / "labels.yaml").write_text("".join(f"{c}: [{c.lower()}]\n" for c in TOY_CLASSES))
    g = zarr.open_group(str(out / "images.zarr"), mode="w", zarr_format=3)
    arr = g.create_array("images", shape=(len(imgs), image_px, image_px, 3), chunks=(16, image_px, image_px, 3),
                         dtype="uint8")
    arr[:] = np.stack(imgs)
    return {"table": out / "fold.parquet", "meta": out / "fold.json", "label_map": out / "labels.yaml",
            "images": {"toy": out / "images.zarr"}, "genes": genes}


def toy_model(out_dir: str | Path, genes: list[str], templates: str | Path, *, organism: str = "Homo sapiens",
              tiny: Any = None, n_genes: int = 8) -> Path:
    """A tiny Gemma-3 over the toy genes, labels and the templates' words."""
    from morphomol.studies.cells.config import TinyModelConfig
    from morphomol.studies.cells.prompts import load_templates
    from morphomol.synthetic.cells_model import build_tiny_gemma3, vocabulary

    tpl = load_templates(templates)
    texts = [t.model_input for v in tpl.values() for t in v] + [t.response for v in tpl.values() for t in v]
    words = vocabulary(genes=genes, label_words={w for c in TOY_CLASSES for w in c.split()}, template_texts=texts,
                       organism=organism, max_number=n_genes)
    return build_tiny_gemma3(out_dir, words, tiny or TinyModelConfig())
