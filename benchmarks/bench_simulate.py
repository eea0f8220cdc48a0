"""Benchmark the paired-cohort simulator at demo size.

    .venv/bin/python benchmarks/bench_simulate.py [--samples 2] [--tissue-um 2500] [--out DIR]

Simulates N demo-sized samples (config/cohorts/demo.yaml parameters and panel) one after the
other in this process and prints seconds per sample, samples/minute, transcripts/s, output
size, the expected number of kept tiles, and the peak RSS. Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from morphomol.synthetic import simulate_sample  # noqa: E402


def _expected_tiles(truth: dict, sample_dir: Path, tile_um: float = 256.0, stride_um: float = 128.0,
                    min_tissue: float = 0.5, min_transcripts: int = 500) -> int:
    """Tile positions (256 µm, stride 128 µm, on the Xenium grid) with >= 50 % tissue and enough transcripts."""
    import pyarrow.parquet as pq

    t = pq.read_table(sample_dir / "xenium" / "transcripts.parquet", columns=["x_location", "y_location"])
    x, y = t.column(0).to_numpy(), t.column(1).to_numpy()
    w, h = truth["tissue_um"]
    cells = pq.read_table(sample_dir / "truth_cells.parquet", columns=["x_um", "y_um"]).to_pandas()
    # tissue fraction from 16-µm occupancy of cell centroids
    occ = np.zeros((math.ceil(h / 16), math.ceil(w / 16)), bool)
    occ[(cells.y_um // 16).astype(int), (cells.x_um // 16).astype(int)] = True
    n = 0
    for y0 in np.arange(0, h - tile_um + 1, stride_um):
        for x0 in np.arange(0, w - tile_um + 1, stride_um):
            frac = occ[int(y0 // 16): int((y0 + tile_um) // 16), int(x0 // 16): int((x0 + tile_um) // 16)].mean()
            cnt = np.count_nonzero((x >= x0) & (x < x0 + tile_um) & (y >= y0) & (y < y0 + tile_um))
            n += frac >= min_tissue and cnt >= min_transcripts
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--tissue-um", type=float, default=None, help="override the demo tissue side (µm)")
    ap.add_argument("--out", default=None, help="output directory (default: a temporary one, removed)")
    args = ap.parse_args()

    cohort = yaml.safe_load((REPO / "config/cohorts/demo.yaml").read_text())
    panel = yaml.safe_load((REPO / "config/cohorts/demo/panel.yaml").read_text())
    sim = dict(cohort["simulate"])
    if args.tissue_um:
        sim["tissue_um"] = [args.tissue_um, args.tissue_um]
    sim["tissue_um"] = tuple(sim["tissue_um"])
    min_tx = int(cohort.get("tiling", {}).get("min_transcripts", 1000))
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_simulate_"))

    # warm-up (imports, numba JIT cache) on a tiny sample, not timed
    simulate_sample(out / "_warmup", sample_id="W", patient_id="P0", core_genes=panel["core"],
                    addon_genes=panel["addon"], seed=0, tissue_um=(300, 300))
    shutil.rmtree(out / "_warmup")

    rows = []
    for i in range(args.samples):
        sid, pid = f"S{i + 1:02d}", f"P{i // 2 + 1}"
        t0, c0 = time.perf_counter(), time.process_time()
        truth = simulate_sample(out / sid, sample_id=sid, patient_id=pid, core_genes=panel["core"],
                                addon_genes=panel["addon"], **sim)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        size = sum(f.stat().st_size for f in (out / sid).rglob("*") if f.is_file())
        tiles = _expected_tiles(truth, out / sid, min_transcripts=min_tx)
        rows.append((sid, wall, cpu, truth["n_cells"], truth["n_transcripts"], size, tiles))
        print(f"{sid}: {wall:6.1f} s wall, {cpu:6.1f} s CPU, {truth['n_cells']:6d} cells, "
              f"{truth['n_transcripts']:8d} transcripts, {size / 2**20:6.1f} MiB, ~{tiles} tiles kept "
              f"(min_transcripts {min_tx}), H&E {truth['he_size_px'][0]}x{truth['he_size_px'][1]} px", flush=True)

    wall = sum(r[1] for r in rows)
    cpu = sum(r[2] for r in rows)
    ntx = sum(r[4] for r in rows)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = {
        "samples": len(rows),
        "tissue_um": list(sim["tissue_um"]),
        "seconds_per_sample_wall": wall / len(rows),
        "seconds_per_sample_cpu": cpu / len(rows),
        "samples_per_minute": 60.0 * len(rows) / wall,
        "transcripts_per_second": ntx / wall,
        "transcripts_per_sample": ntx / len(rows),
        "tiles_per_sample": float(np.mean([r[6] for r in rows])),
        "peak_rss_mib": peak,
    }
    print(json.dumps(summary, indent=1))
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
