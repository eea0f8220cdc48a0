"""Streaming transcript reader throughput and peak memory (figures printed, never asserted).

Writes a synthetic ``transcripts.parquet`` with the 10x columns (feature_name as a
dictionary-encoded string, ~2% control features, qv spread so ~15% fall below 20) into a
temporary directory, then times ``XeniumBundle.iter_transcripts``:

    .venv/bin/python benchmarks/bench_readers.py            # 5e6 rows
    .venv/bin/python benchmarks/bench_readers.py 2e7 --batch-size 2000000 --csv

Each timed figure is the best of two passes after one warm-up pass (page cache warm).
Files are written in a child process, so the printed peak RSS (ru_maxrss of this process,
cumulative) is the reader's: imports first, then after each phase.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from morphomol.io.xenium import XeniumBundle


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def write_synthetic(d: Path, n: int, n_genes: int = 380, chunk: int = 1_000_000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    genes = [f"GENE{i:04d}" for i in range(n_genes)]
    controls = [f"BLANK_{i:04d}" for i in range(20)] + [f"NegControlProbe_{i:05d}" for i in range(20)]
    names = pa.array(genes + controls)
    (d / "experiment.xenium").write_text(json.dumps({"pixel_size": 0.2125}))
    path = d / "transcripts.parquet"
    writer = None
    tid = 281474976710656
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        is_ctrl = rng.random(m) < 0.02
        codes = np.where(is_ctrl, n_genes + rng.integers(0, len(controls), m), rng.integers(0, n_genes, m)).astype(np.int32)
        table = pa.table({
            "transcript_id": pa.array(np.arange(tid + start, tid + start + m, dtype=np.uint64)),
            "cell_id": pa.array(np.where(rng.random(m) < 0.3, "UNASSIGNED", "aaaabbbb-1")),
            "overlaps_nucleus": pa.array(rng.integers(0, 2, m).astype(np.uint8)),
            "feature_name": pa.DictionaryArray.from_arrays(pa.array(codes), names),
            "x_location": pa.array(rng.uniform(0, 10_000, m).astype(np.float32)),
            "y_location": pa.array(rng.uniform(0, 8_000, m).astype(np.float32)),
            "z_location": pa.array(rng.uniform(10, 30, m).astype(np.float32)),
            "qv": pa.array(np.minimum(40.0, rng.gamma(6.0, 5.0, m)).astype(np.float32)),
            "fov_name": pa.array(np.full(m, "A1")),
            "nucleus_distance": pa.array(rng.exponential(3.0, m).astype(np.float32)),
        })
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table, row_group_size=1_000_000)
    assert writer is not None
    writer.close()
    return path


def run(bundle: XeniumBundle, batch_size: int, qv_min: float | None) -> tuple[int, int, float]:
    t0 = time.perf_counter()
    rows = kept = 0
    for b in bundle.iter_transcripts(batch_size=batch_size, qv_min=qv_min):
        rows += b.n_rows_read
        kept += len(b)
        np.bincount(b.gene_codes, minlength=len(b.gene_names))  # a minimal consumer
    return rows, kept, time.perf_counter() - t0


def write_csv_gz(d: Path) -> None:
    """Convert the synthetic parquet to transcripts.csv.gz (older 10x export)."""
    import pyarrow.csv as pacsv

    path = d / "transcripts.parquet"
    table = pq.read_table(path)
    table = table.set_column(3, "feature_name", table.column("feature_name").cast(pa.string()))
    with pa.CompressedOutputStream(str(d / "transcripts.csv.gz"), "gzip") as out:
        pacsv.write_csv(table, out)


def _in_child(fn, *args) -> None:
    """Run a writer in a separate process so this process's peak RSS is the reader's."""
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=fn, args=args)
    p.start()
    p.join()
    if p.exitcode != 0:
        raise SystemExit(f"writer failed with exit code {p.exitcode}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n", nargs="?", type=float, default=5e6, help="rows (default 5e6)")
    ap.add_argument("--batch-size", type=int, default=1_000_000)
    ap.add_argument("--csv", action="store_true", help="also time transcripts.csv.gz (slow to write)")
    args = ap.parse_args(argv)
    n = int(args.n)
    print(f"python {sys.version.split()[0]}, pyarrow {pa.__version__}, rows {n:,}, batch_size {args.batch_size:,}")
    with tempfile.TemporaryDirectory(prefix="bench_readers_") as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        _in_child(write_synthetic, d, n)
        path = d / "transcripts.parquet"
        print(f"wrote {path.name} (child process): {path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
        print(f"reader process baseline peak RSS {peak_rss_mb():.0f} MB (imports)")
        bundle = XeniumBundle(d)
        t0 = time.perf_counter()
        genes = bundle.feature_names()
        dt = time.perf_counter() - t0
        print(f"feature_names() scan: {len(genes)} genes, {n / dt / 1e6:.1f} M rows/s ({dt:.2f} s); peak RSS {peak_rss_mb():.0f} MB")
        run(bundle, args.batch_size, None)  # warm the page cache: every timed pass reads warm
        for label, qv in (("no qv filter", None), ("qv >= 20", 20.0)):
            rows, kept, dt = min((run(bundle, args.batch_size, qv) for _ in range(2)), key=lambda r: r[2])
            print(f"iter_transcripts parquet, {label:12s}: {rows / dt / 1e6:6.2f} M transcripts/s read "
                  f"({kept:,} kept, {dt:.2f} s); peak RSS {peak_rss_mb():.0f} MB")
        if args.csv:
            t0 = time.perf_counter()
            _in_child(write_csv_gz, d)
            path.unlink()
            print(f"wrote transcripts.csv.gz (child process) in {time.perf_counter() - t0:.1f} s")
            bundle = XeniumBundle(d)
            t0 = time.perf_counter()
            bundle.feature_names()
            dt = time.perf_counter() - t0
            print(f"feature_names() scan csv.gz: {n / dt / 1e6:.2f} M rows/s; peak RSS {peak_rss_mb():.0f} MB")
            for label, qv in (("no qv filter", None), ("qv >= 20", 20.0)):
                rows, kept, dt = run(bundle, args.batch_size, qv)
                print(f"iter_transcripts csv.gz,  {label:12s}: {rows / dt / 1e6:6.2f} M transcripts/s read "
                      f"({kept:,} kept, {dt:.2f} s); peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
