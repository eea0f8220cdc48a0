"""Scale of the heavy jobs (issue 22): peak memory and time at three sizes, extrapolated to the seeds' scale.

    .venv/bin/python benchmarks/bench_scale.py --quick [--json scale.json] [--stages slides_fold,splits]
    .venv/bin/python benchmarks/bench_scale.py --dag-only --dag-sizes slides=100,1000,10000 xenium=60,300,1000

For every stage of ``benchmarks/scale/`` (one module per area; a stage = one heavy job, called through the
library function its rule's script calls) and each of three sizes ``n`` (slides, tiles, cells, spots):

1. the inputs are written with the project's own writers by the harness process (not measured);
2. the job runs in a fresh process (one thread): its peak RSS (``VmHWM``) and wall time are recorded;
3. peak RSS is fitted as ``a + b·n`` and time as ``c·n^p`` over the three sizes and extrapolated to the
   stage's ``seed_n`` (the seeds' scale: slides 10,000 WSIs × 10,000 tiles × 1536-d, 20 k genes; cells 1.7 M ×
   2,000 HVGs; spots 200 k × 1536-d; fusion 1 M tiles × 1536-d). ``p`` is the time exponent (≤ ~1.1: not
   faster than N log N).

Then the DAG curve: ``snakemake -n`` on generated simulated cohorts of n slides / n xenium samples (the
workflow as users run it, with this repository's Snakefile), wall time and peak RSS of the snakemake process.

Writes JSON ``{"stages": [{"stage", "unit", "sizes", "peak_rss_mb", "seconds", "fit", "extrapolated": {"n",
"peak_rss_gb", "hours"}}], "dag": [{"cohort", "n", "seconds", "peak_rss_mb"}]}`` and prints a table. Asserts
nothing: figures are reported, never tested.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

#: environment of every measured process: one thread (as a 1-core job), no progress bars
CHILD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
             "MORPHOMOL_PROGRESS": "off", "PYTHONHASHSEED": "0"}


# ----------------------------------------------------------------------------- child processes
def _peak_rss_mb() -> float:
    """This process's peak RSS in MB: VmHWM (reset by exec, unlike ru_maxrss, which a child started from a large
    parent inherits), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(stage_name: str, workdir: Path) -> None:
    """Run one stage's job on the inputs prepared in ``workdir`` in this (fresh) process; print one JSON line."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from scale import all_stages

    stage = all_stages()[stage_name]
    kwargs = json.loads((workdir / "kwargs.json").read_text())
    base = _peak_rss_mb()
    t0 = time.perf_counter()
    stage.run(kwargs, workdir)
    dt = time.perf_counter() - t0
    peak = _peak_rss_mb()
    print(json.dumps({"seconds": dt, "peak_rss_mb": peak, "baseline_rss_mb": base}))


def _spawn(args: list[str], timeout: float | None = None) -> dict[str, Any]:
    env = {**os.environ, **CHILD_ENV}
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed (rc {p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- fits
def fit_memory(sizes: list[int], mb: list[float], n: int) -> tuple[dict[str, float], float]:
    """(a + b·n fit, extrapolated MB at n)."""
    b, a = np.polyfit(np.asarray(sizes, float), np.asarray(mb, float), 1)
    b = max(float(b), 0.0)
    return {"intercept_mb": float(a), "mb_per_unit": b}, float(a + b * n)


def fit_time(sizes: list[int], sec: list[float], n: int) -> tuple[dict[str, float], float]:
    """(c·n^p fit, extrapolated seconds at n)."""
    x, y = np.log(np.asarray(sizes, float)), np.log(np.maximum(np.asarray(sec, float), 1e-3))
    p, logc = np.polyfit(x, y, 1)
    return {"exponent": float(p), "coef": float(np.exp(logc))}, float(np.exp(logc) * n ** p)


# ----------------------------------------------------------------------------- stages
def bench_stage(stage: Any, sizes: tuple[int, ...], keep: Path | None) -> dict[str, Any]:
    rows = []
    for n in sizes:
        work = Path(tempfile.mkdtemp(prefix=f"scale_{stage.name}_{n}_", dir=keep))
        try:
            # inputs written here, in the harness process (its memory is not measured; one process start less)
            (work / "kwargs.json").write_text(json.dumps(stage.prepare(n, work)))
            r = _spawn(["--child", stage.name, str(work)])
        finally:
            if keep is None:
                shutil.rmtree(work, ignore_errors=True)
        rows.append(r)
        print(f"  {stage.name:<28} n={n:>9,} {stage.unit:<7} peak {r['peak_rss_mb']:>8.0f} MB "
              f"(start {r['baseline_rss_mb']:.0f} MB)  {r['seconds']:>8.2f} s", flush=True)
    s = list(sizes)
    mem = [r["peak_rss_mb"] for r in rows]
    sec = [r["seconds"] for r in rows]
    mfit, mb = fit_memory(s, mem, stage.seed_n)
    tfit, t = fit_time(s, sec, stage.seed_n)
    return {"stage": stage.name, "unit": stage.unit, "note": stage.note, "sizes": s, "peak_rss_mb": mem,
            "baseline_rss_mb": [r["baseline_rss_mb"] for r in rows], "seconds": sec,
            "fit": {**mfit, **tfit},
            "extrapolated": {"n": stage.seed_n, "peak_rss_gb": mb / 1024, "hours": t / 3600}}


# ----------------------------------------------------------------------------- DAG
def _dag_config(kind: str, n: int, work: Path) -> Path:
    """A config with one simulated cohort of ``n`` samples (sheet and cohort YAML under ``work``)."""
    import yaml

    cohort = f"{kind}_{n}"
    d = work / cohort
    d.mkdir(parents=True, exist_ok=True)
    if kind == "slides":
        src = yaml.safe_load((ROOT / "config/cohorts/demo_slides.yaml").read_text())
        rows = ["sample_id\tpatient_id\tslide_path\tcohort\tcancer_type\the_mpp"]
        for i in range(n):
            s = f"SL{i:06d}"
            rows.append(f"{s}\tP{i // 2:06d}\tresults/{cohort}/simulated/slides/{s}.tif\tC{(i // 2) % 2}\tLUAD\t0.5")
        src["slides"]["rna"]["path"] = f"results/{cohort}/simulated/rna_counts.tsv"
        src["slides"]["gene_sets"]["gmt"] = [str(ROOT / "config/cohorts/demo_slides/h.all.v7.0.symbols.gmt")]
        src["simulate"]["gmt"] = str(ROOT / "config/cohorts/demo_slides/h.all.v7.0.symbols.gmt")
    else:
        src = yaml.safe_load((ROOT / "config/cohorts/demo.yaml").read_text())
        src["panel"] = str(ROOT / "config/cohorts/demo/panel.yaml")
        rows = ["sample_id\tpatient_id\txenium_dir\the_path\the_mpp\talignment\tregions"]
        for i in range(n):
            s, b = f"S{i:06d}", f"results/{cohort}/simulated/S{i:06d}"
            rows.append(f"{s}\tP{i // 2:06d}\t{b}/xenium\t{b}/he.tif\t0.5\t{b}/keypoints.csv\t{b}/regions.geojson")
    (d / "samples.tsv").write_text("\n".join(rows) + "\n")
    src["samples"] = str(d / "samples.tsv")
    (work / f"{cohort}.yaml").write_text(yaml.safe_dump(src))
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    cfg["cohorts"] = {cohort: str(work / f"{cohort}.yaml")}
    for k in ("experiments",):
        if k in cfg and "settings_file" in cfg[k]:
            cfg[k]["settings_file"] = str(ROOT / cfg[k]["settings_file"])
    path = work / f"config_{cohort}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _dag_child(argv: list[str]) -> None:
    """``snakemake -n`` in this (fresh) process; prints its wall time and peak RSS as one JSON line."""
    import contextlib
    import io

    from snakemake.cli import main as snakemake_main

    t0 = time.perf_counter()
    rc = 0
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            snakemake_main(argv)
        except SystemExit as exc:
            rc = int(exc.code or 0)
    dt = time.perf_counter() - t0
    print(json.dumps({"rc": rc, "seconds": dt, "peak_rss_mb": _peak_rss_mb(), "stderr": err.getvalue()[-3000:]}))


def bench_dag(kind: str, n: int) -> dict[str, Any]:
    """``snakemake -n`` of a generated cohort, run in a fresh process (wall time includes its imports)."""
    with tempfile.TemporaryDirectory(prefix=f"dag_{kind}_{n}_") as tmp:
        work = Path(tmp)
        cfg = _dag_config(kind, n, work)
        argv = ["-n", "--quiet", "rules", "--snakefile", str(ROOT / "Snakefile"), "--configfile", str(cfg),
                "--directory", str(work), "--cores", "1"]
        t0 = time.perf_counter()
        r = _spawn(["--dag-child", json.dumps(argv)])
        wall = time.perf_counter() - t0
    if r["rc"] != 0:
        raise RuntimeError(f"snakemake -n on {kind} x {n} failed:\n{r['stderr']}")
    print(f"  dag {kind:<8} n={n:>7,}  {wall:7.1f} s  peak {r['peak_rss_mb']:6.0f} MB", flush=True)
    return {"cohort": kind, "n": n, "seconds": wall, "peak_rss_mb": r["peak_rss_mb"]}


def _sizes(spec: list[str]) -> dict[str, list[int]]:
    out = {}
    for s in spec:
        k, v = s.split("=")
        out[k] = [int(x) for x in v.split(",")]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the small sizes (all stages in about 10 minutes here)")
    ap.add_argument("--stages", default="", help="comma-separated stage names (default: all)")
    ap.add_argument("--json", default="", help="write the figures here")
    ap.add_argument("--keep", default="", help="keep the inputs under this directory (default: temporary)")
    ap.add_argument("--no-dag", action="store_true", help="skip the snakemake -n curve")
    ap.add_argument("--dag-only", action="store_true", help="only the snakemake -n curve")
    ap.add_argument("--dag-sizes", nargs="*", default=None,
                    help="kind=n1,n2,n3 (kinds: slides, xenium); default slides=100,500,1000 xenium=60,150,300 "
                         "(--quick) or slides=100,1000,10000 xenium=60,300,1000")
    ap.add_argument("--child", nargs=2, metavar=("STAGE", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--dag-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dag_child:
        _dag_child(json.loads(args.dag_child))
        return
    if args.child:
        st, d = args.child
        _child(st, Path(d))
        return
    import logging

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("MORPHOMOL_PROGRESS", "off")
    from scale import all_stages

    stages = all_stages()
    names = [s for s in args.stages.split(",") if s] or list(stages)
    unknown = [s for s in names if s not in stages]
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; known: {', '.join(stages)}")
    keep = Path(args.keep) if args.keep else None
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                       "python": platform.python_version()},
                           "quick": bool(args.quick), "stages": [], "dag": []}
    t_all = time.perf_counter()
    if not args.dag_only:
        for name in names:
            st = stages[name]
            print(f"{name}: {st.note}", flush=True)
            out["stages"].append(bench_stage(st, st.quick if args.quick else st.full, keep))
            if args.json:
                Path(args.json).write_text(json.dumps(out, indent=1))
    if not args.no_dag:
        default = ["slides=100,500,1000", "xenium=60,150,300"] if args.quick else ["slides=100,1000,10000",
                                                                                      "xenium=60,300,1000"]
        for kind, ns in _sizes(args.dag_sizes or default).items():
            for n in ns:
                out["dag"].append(bench_dag(kind, n))
                if args.json:
                    Path(args.json).write_text(json.dumps(out, indent=1))
    out["seconds"] = time.perf_counter() - t_all
    print()
    print(f"{'stage':<28} {'unit':<7} {'sizes':<26} {'peak MB':<22} {'time exp':>8} {'seed n':>12} "
          f"{'peak GB @seed':>13} {'hours @seed':>11}")
    for r in out["stages"]:
        e = r["extrapolated"]
        print(f"{r['stage']:<28} {r['unit']:<7} {','.join(map(str, r['sizes'])):<26} "
              f"{'/'.join(f'{m:.0f}' for m in r['peak_rss_mb']):<22} {r['fit']['exponent']:>8.2f} {e['n']:>12,} "
              f"{e['peak_rss_gb']:>13.2f} {e['hours']:>11.2f}")
    for r in out["dag"]:
        print(f"dag {r['cohort']:<8} n={r['n']:>7,}  {r['seconds']:.1f} s  {r['peak_rss_mb']:.0f} MB")
    print(f"total {out['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
