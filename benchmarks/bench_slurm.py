"""SLURM overhead of `snakemake --profile profiles/slurm` on the CI cluster.

    sudo .ci/slurm/start_cluster.sh
    .venv/bin/python benchmarks/bench_slurm.py [--repeats 1]

Runs the fixture workflow tests/slurm_fixture (tile -> features -> train, 3 SLURM jobs)
through the CI variant of the user profile and prints, per run: wall time, jobs
submitted, and per job the SLURM queue wait (SubmitTime -> StartTime) and run time
(StartTime -> EndTime) from `scontrol show job`. Wall time minus the jobs' run time is
the cost of submission + status polling (the plugin polls 2 s after submission, then
every +10 s while nothing finishes). Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _ts(s: str) -> datetime:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S")


def job_times(jobid: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", jobid], capture_output=True, text=True).stdout
    f = dict(re.findall(r"\b(SubmitTime|StartTime|EndTime|Partition|Comment|JobState)=(\S+)", out))
    if not {"SubmitTime", "StartTime", "EndTime"} <= f.keys():
        return {"jobid": jobid, "error": "job no longer known to slurmctld"}
    return {"jobid": jobid, "rule": f.get("Comment", "").removeprefix("rule_"), "partition": f.get("Partition"),
            "state": f.get("JobState"),
            "queue_s": (_ts(f["StartTime"]) - _ts(f["SubmitTime"])).total_seconds(),
            "run_s": (_ts(f["EndTime"]) - _ts(f["StartTime"])).total_seconds()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    spec = importlib.util.spec_from_file_location("ci_profile", REPO / ".ci" / "slurm" / "ci_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with tempfile.TemporaryDirectory(prefix="bench_slurm_") as tmp:
        profile = mod.write_ci_profile(Path(tmp) / "profile")
        for i in range(a.repeats):
            work = Path(tmp) / f"run{i}"
            t0 = time.monotonic()
            res = subprocess.run([sys.executable, "-m", "snakemake", "--profile", str(profile), "-s",
                                  str(REPO / "tests" / "slurm_fixture" / "Snakefile"), "--directory", str(work)],
                                 cwd=REPO, capture_output=True, text=True)
            wall = time.monotonic() - t0
            ids = re.findall(r"has been submitted with SLURM jobid (\d+)", res.stdout + res.stderr)
            jobs = [job_times(j) for j in ids]
            run_total = sum(j.get("run_s", 0) for j in jobs)
            print(json.dumps({"run": i, "returncode": res.returncode, "wall_s": round(wall, 1),
                              "jobs_submitted": len(ids), "jobs_run_s": run_total,
                              "overhead_s": round(wall - run_total, 1), "jobs": jobs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
