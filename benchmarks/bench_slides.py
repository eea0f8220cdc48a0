"""Slides study speed figures (issue 17): ssGSEA, whole-slide tiling + feature extraction, alignment training.

    .venv/bin/python benchmarks/bench_slides.py [--samples 100] [--genes 20000] [--slides 8] [--vit small|demo|large]

* ssGSEA (gseapy, raw ES): gene sets x samples per second on a log-expression matrix of ``--genes`` genes,
  the 50 Hallmark sets + 10 null sets;
* tiling: simulated 640 x 480 µm slides (tissue detection, 256 px @ 0.5 µm/px tiles -> 224 px store):
  tiles/s; feature extraction over those stores with the registry's ``vit_s`` (random init) at the
  geometry of ``--vit`` (demo: 384-d, 1 layer; small: ViT-S/16; large: ViT-L/16 = UNI geometry): tiles/s;
* alignment: projection heads trained with the shared loop on ``--samples`` slides (mean-pooled 384-d
  features, 64 RNA components): slides/s per epoch.

Prints figures; asserts nothing. The device figure of the issue (ViT-L tiles/s on a GPU) is
``--vit large --device cuda`` on a machine with one.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
GMT = ROOT / "tests" / "data" / "slides_gene_sets" / "h.all.v7.0.symbols.gmt"
GEOMETRY = {"demo": {"embed_dim": 384, "depth": 1, "num_heads": 6},
            "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
            "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16}}


def bench_ssgsea(n_samples: int, n_genes: int) -> None:
    from morphomol.studies.slides.genesets import null_sets, read_gmt, ssgsea

    sets = read_gmt(GMT)
    genes = sorted({g for v in sets.values() for g in v})
    genes += [f"BG{i}" for i in range(max(0, n_genes - len(genes)))]
    rng = np.random.default_rng(0)
    expr = pd.DataFrame(rng.gamma(2.0, 2.0, size=(len(genes), n_samples)), index=genes,
                        columns=[f"S{i}" for i in range(n_samples)])
    all_sets = {**sets, **null_sets([len(v) for v in sets.values()], genes, 10, 0)}
    t0 = time.perf_counter()
    es = ssgsea(expr, all_sets)
    dt = time.perf_counter() - t0
    print(f"ssGSEA: {len(all_sets)} sets x {n_samples} samples over {len(genes)} genes in {dt:.2f} s = "
          f"{es.size / dt:,.0f} set-samples/s")


def bench_tiles_features(n_slides: int, vit: str, device: str) -> None:
    from morphomol.config import EncoderConfig, FeaturesConfig, ViTConfig
    from morphomol.features import extract_features_group
    from morphomol.studies.slides.config import SlideTilingConfig
    from morphomol.studies.slides.tiles import tile_slides
    from morphomol.synthetic.slides_render import H_OD, Stain, render_slide, write_slide

    stain = Stain(H_OD, np.array([0.216, 0.801, 0.558]) / np.linalg.norm([0.216, 0.801, 0.558]), 1.0, 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        samples = [f"S{i}" for i in range(n_slides)]
        for i, s in enumerate(samples):
            rgb, _ = render_slide(width_px=1280, height_px=960, mpp=0.5, tumour_per_mm2=3000, lymph_per_mm2=2000,
                                  stain=stain, rng=np.random.default_rng(i))
            write_slide(d / f"{s}.tif", rgb, 0.5)
        stores = [d / s / "images.zarr" for s in samples]
        t0 = time.perf_counter()
        counts = tile_slides(slides=[d / f"{s}.tif" for s in samples], samples=samples, patients=samples,
                             he_mpp=[None] * n_slides, out_units=[d / s / "units.h5ad" for s in samples],
                             out_stores=stores, out_qc=[d / s / "qc.png" for s in samples], cfg=SlideTilingConfig())
        dt = time.perf_counter() - t0
        n = sum(counts)
        print(f"tiling: {n_slides} slides, {n} tiles (256 px @ 0.5 µm/px -> 224 px) in {dt:.2f} s = {n / dt:.0f} tiles/s")
        g = GEOMETRY[vit]
        t0 = time.perf_counter()
        out = extract_features_group("vit_s", samples=samples, stores=stores, outs=[d / "f" / f"{s}.zarr" for s in samples],
                                     encoder=EncoderConfig(pooling="mean"),
                                     features=FeaturesConfig(batch_size=64, encoders=("vit_s",), device=device,
                                                             patch_tokens=False), vit=ViTConfig(**g))
        dt = time.perf_counter() - t0
        rates = [v.get("tiles_per_second", float("nan")) for v in out.values()]
        print(f"features ({vit} ViT {g}, {device}): {n} tiles in {dt:.2f} s with model load = {n / dt:.1f} tiles/s; "
              f"per slide {np.nanmedian(rates):.1f} tiles/s (median)")


def bench_align(n_samples: int) -> None:
    from morphomol.studies.slides.align import AlignData, build_model, train_align
    from morphomol.studies.slides.config import AlignConfig

    rng = np.random.default_rng(0)
    z = rng.normal(size=(n_samples, 4))
    data = AlignData([f"s{i}" for i in range(n_samples)],
                     {"slide": (z @ rng.normal(size=(4, 384)) + rng.normal(size=(n_samples, 384))).astype(np.float32),
                      "rna": (z @ rng.normal(size=(4, 64)) + rng.normal(size=(n_samples, 64))).astype(np.float32)})
    n_fit = int(0.8 * n_samples)
    cfg = AlignConfig(epochs=20, patience=20, batch_size=64)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(data.subset(np.arange(n_fit)), cfg, bag=False, seed=0)
        res = train_align(model, data.subset(np.arange(n_fit)), data.subset(np.arange(n_fit, n_samples)), cfg,
                          work_dir=Path(tmp) / "w", seed=0, fingerprint={"bench": "1"}, threads=1)
    print(f"alignment: {n_fit} fit slides, {res.epochs_run} epochs in {res.train_seconds:.2f} s = "
          f"{res.tiles_per_second:,.0f} slides/s (1 thread, CPU)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--genes", type=int, default=20000)
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--vit", choices=sorted(GEOMETRY), default="small")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    bench_ssgsea(args.samples, args.genes)
    bench_tiles_features(args.slides, args.vit, args.device)
    bench_align(args.samples)


if __name__ == "__main__":
    main()
