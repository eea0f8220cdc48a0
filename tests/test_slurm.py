"""`snakemake --profile profiles/slurm` on a real SLURM cluster.

The cluster is the single-node CI cluster of .ci/slurm/start_cluster.sh (partitions
cpu, gpu-h100, gpu-a100; dummy GPUs gpu:h100:1 + gpu:a100:1). Tests marked `slurm`
run when `sbatch` is on PATH and the controller answers, skip otherwise -- and FAIL
under CI=true when the cluster is not up.

Snakemake is run with the user profile profiles/slurm turned into its CI variant
by .ci/slurm/ci_profile.py (squeue status checks, no account, resource sizes
clamped to the 2-core node; gpu_model, partitions.yaml and attempt scaling are the
user's). The fixture workflow tests/slurm_fixture writes what SLURM gave each job
(env + `scontrol show job`) to records/<rule>/<jobid>.txt.

Wall time and number of submitted jobs of every SLURM run are printed (pytest -s)
and written to $MORPHOMOL_SLURM_REPORT (default benchmarks/out/slurm_tests.json).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "slurm_fixture" / "Snakefile"
USER_PROFILE = REPO / "profiles" / "slurm"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPORT = Path(os.environ.get("MORPHOMOL_SLURM_REPORT", REPO / "benchmarks" / "out" / "slurm_tests.json"))
SLURM_TOOLS = re.compile(
    r"^(sbatch|squeue|sinfo|sacct|sacctmgr|scontrol|srun|scancel|sshare|salloc|sattach|sbcast|"
    r"scrontab|sdiag|sprio|sreport|sstat|strigger|sview|sh5util|slurm\w*)$"
)
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+)")


# --------------------------------------------------------------------------- helpers
def _load_ci_profile_module():
    spec = importlib.util.spec_from_file_location("ci_profile", REPO / ".ci" / "slurm" / "ci_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _user_profile() -> dict:
    return yaml.safe_load((USER_PROFILE / "config.v8+.yaml").read_text())


def _partitions() -> dict:
    return yaml.safe_load((USER_PROFILE / "partitions.yaml").read_text())["partitions"]


def _env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}


def _snakemake_cmd(profile: Path, workdir: Path, *extra: str, snakefile: Path = FIXTURE) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--profile", str(profile), "-s", str(snakefile),
            "--directory", str(workdir), *extra]


def _record_run(name: str, wall_s: float, log: str, **more) -> dict:
    jobs = SUBMITTED.findall(log)
    entry = {"test": name, "wall_s": round(wall_s, 1), "jobs_submitted": len(jobs), "slurm_job_ids": jobs, **more}
    print(f"\n[slurm timing] {json.dumps(entry)}")
    try:
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(REPORT.read_text()) if REPORT.exists() else []
        data.append({**entry, "when": time.strftime("%Y-%m-%dT%H:%M:%S")})
        REPORT.write_text(json.dumps(data, indent=1))
    except (OSError, ValueError) as e:  # the report is informative only
        print(f"[slurm timing] could not write {REPORT}: {e}")
    return entry


def _run(name: str, cmd: list[str], timeout: float = 600, **more) -> tuple[subprocess.CompletedProcess, dict]:
    t0 = time.monotonic()
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    out = res.stdout + res.stderr
    return res, _record_run(name, time.monotonic() - t0, out, returncode=res.returncode, **more)


class Background:
    """A snakemake run in the background (so a test can scancel its jobs)."""

    def __init__(self, cmd: list[str], log: Path):
        self.log = log
        self._fh = log.open("w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=self._fh, stderr=subprocess.STDOUT)

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()  # snakemake cancels its SLURM jobs on SIGTERM
            self.proc.wait(timeout=60)
            raise
        finally:
            self._fh.close()
        return rc

    @property
    def output(self) -> str:
        return self.log.read_text()


def _wait_for(pred, timeout: float, what: str, proc: Background | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        if proc is not None and proc.proc.poll() is not None:
            pytest.fail(f"snakemake exited ({proc.proc.returncode}) before {what}:\n{proc.output[-4000:]}")
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout}s waiting for {what}" + (f":\n{proc.output[-4000:]}" if proc else ""))


def _records(workdir: Path, rule: str) -> list[dict]:
    """Records of every SLURM job of `rule`, oldest job first."""
    out = []
    for f in (workdir / "records" / rule).glob("*.txt"):
        text = f.read_text()
        env, _, scontrol = text.partition("--- scontrol show job")
        rec = dict(line.split("=", 1) for line in env.splitlines() if "=" in line)
        rec["scontrol"] = scontrol
        for key in ("Partition", "TresPerJob", "MinMemoryNode", "TRES", "JobState"):
            m = re.search(rf"\b{key}=(\S+)", scontrol)
            rec[key] = m.group(1) if m else None
        out.append(rec)
    return sorted(out, key=lambda r: int(r["SLURM_JOB_ID"]))


def _scontrol_job(jobid: str) -> str:
    return subprocess.run(["scontrol", "show", "job", jobid], capture_output=True, text=True).stdout


def _mem_mb(value: str | None) -> int | None:
    """'8000M' / '8G' (scontrol) -> MB."""
    if not value:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([MGT]?)", value)
    assert m, value
    return int(float(m.group(1)) * {"": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[m.group(2)])


def _expected_gpu_routing() -> dict[str, tuple[str, str]]:
    """rule -> (gpu_model, partition) as the user profile + partitions.yaml define it."""
    routing = {}
    for rule, res in (_user_profile().get("set-resources") or {}).items():
        model = res.get("gpu_model")
        if not model:
            continue
        parts = [name for name, lim in _partitions().items() if model in (lim.get("available_gpu_models") or [])]
        assert len(parts) == 1, f"gpu_model {model} of rule {rule} must be in exactly one partition, got {parts}"
        routing[rule] = (model, parts[0])
    return routing


def _cpu_partition() -> str:
    cpu = [name for name, lim in _partitions().items() if not lim.get("max_gpu")]
    assert len(cpu) == 1, cpu
    return cpu[0]


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH"
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed: {e}"
    states = res.stdout.split()
    if res.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no usable SLURM node (sinfo rc={res.returncode}: {res.stdout.strip()} {res.stderr.strip()})"
    return None


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def slurm_cluster():
    problem = _cluster_problem()
    if problem:
        if IN_CI:
            pytest.fail(f"CI=true but the SLURM cluster is not up: {problem}. Run .ci/slurm/start_cluster.sh first.")
        pytest.skip(f"{problem} (start a test cluster with: sudo .ci/slurm/start_cluster.sh)")


@pytest.fixture(scope="session")
def ci_profile(slurm_cluster, tmp_path_factory) -> Path:
    return _load_ci_profile_module().write_ci_profile(tmp_path_factory.mktemp("profile") / "slurm-ci")


# --------------------------------------------------------------------------- no cluster needed
def test_profile_dry_run_works_without_slurm(tmp_path):
    """`snakemake --profile profiles/slurm -n` on a machine without any SLURM command."""
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/bin"]:
        if not d or not Path(d).is_dir() or Path(d) == Path(sys.executable).parent:
            continue
        for exe in Path(d).iterdir():
            if SLURM_TOOLS.match(exe.name) or (fakebin / exe.name).exists():
                continue
            if exe.is_file() and os.access(exe, os.X_OK):
                (fakebin / exe.name).symlink_to(exe)
    path = f"{Path(sys.executable).parent}{os.pathsep}{fakebin}"
    assert shutil.which("sbatch", path=path) is None and shutil.which("sinfo", path=path) is None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SNAKEMAKE_SLURM"))}
    env["PATH"] = path
    work = tmp_path / "work"
    work.mkdir()
    res = subprocess.run([sys.executable, "-m", "snakemake", "--profile", str(USER_PROFILE), "-s", str(FIXTURE),
                          "--directory", str(work), "-n"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    # the profile's GPU settings reach the GPU rules, and only them
    for rule, (model, _) in _expected_gpu_routing().items():
        if rule in ("features", "fusion_train"):
            block = out.split(f"rule {rule}:", 1)[1].split("\n\n", 1)[0]
            assert f"gpu_model={model}" in block and "gpu=1" in block, block
    tile = out.split("rule tile:", 1)[1].split("\n\n", 1)[0]
    assert "gpu" not in tile.split("resources:", 1)[1], tile
    assert "mem_mb=4000" in tile, tile  # default-resources "4000 * attempt", attempt 1


def test_partition_file_routes_each_gpu_model_to_its_partition():
    """The plugin's own partition scorer, fed with the user's partitions.yaml and profile values."""
    from snakemake_executor_plugin_slurm.partitions import get_best_partition, read_partition_file

    class Res(dict):
        def __getattr__(self, k):
            return self[k]

    class Job:  # the attributes the scorer reads
        def __init__(self, name, **res):
            self.name, self.threads, self.resources = name, 1, Res(res)

    class Log:
        def info(self, *a):
            pass

        debug = warning = info

    parts = read_partition_file(USER_PROFILE / "partitions.yaml")
    prof = _user_profile()
    attempt = 1

    def ev(v):
        return eval(str(v), {"attempt": attempt}) if isinstance(v, str) and "attempt" in v else v

    for rule, (model, partition) in _expected_gpu_routing().items():
        res = {k: ev(v) for k, v in prof["set-resources"][rule].items()}
        job = Job(rule, gpu=1, **res)
        assert get_best_partition(parts, job, Log()) == partition, (rule, res)
    cpu = Job("tile", **{k: ev(v) for k, v in prof["default-resources"].items()})
    assert get_best_partition(parts, cpu, Log()) == _cpu_partition()
    assert {m for m, _ in _expected_gpu_routing().values()} == {"h100", "a100"}


# --------------------------------------------------------------------------- real cluster
@pytest.mark.slurm
def test_gpu_rules_go_to_gpu_partitions_cpu_rules_to_cpu(ci_profile, tmp_path):
    work = tmp_path / "work"
    res, stats = _run("routing", _snakemake_cmd(ci_profile, work), timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert stats["jobs_submitted"] == 3, out[-6000:]

    (tile,) = _records(work, "tile")
    assert tile["SLURM_JOB_PARTITION"] == _cpu_partition() == tile["Partition"], tile
    assert tile["TresPerJob"] is None and not re.search(r"gres[:/]gpu", tile["scontrol"]), tile["scontrol"]
    assert _mem_mb(tile["MinMemoryNode"]) == 4000  # profile default-resources, attempt 1

    routing = _expected_gpu_routing()
    seen = set()
    for rule in ("features", "fusion_train"):
        model, partition = routing[rule]
        (rec,) = _records(work, rule)
        assert rec["SLURM_JOB_PARTITION"] == partition == rec["Partition"], rec
        assert rec["TresPerJob"] == f"gres:gpu:{model}:1", rec["scontrol"]
        seen.add(partition)
    assert len(seen) == 2  # H100 and A100 partitions both exercised
    assert (work / "out" / "model.txt").exists()


@pytest.mark.slurm
def test_cpu_job_killed_once_is_retried_with_more_memory(ci_profile, tmp_path):
    work = tmp_path / "work"
    bg = Background(_snakemake_cmd(ci_profile, work, "--config", "tile_sleep=15", "epochs=1", "epoch_seconds=0"),
                    tmp_path / "snakemake.log")
    first = _wait_for(lambda: _records(work, "tile"), 180, "the first tile job to start", bg)[0]
    subprocess.run(["scancel", first["SLURM_JOB_ID"]], check=True)
    rc = bg.wait(timeout=600)
    out = bg.output
    stats = _record_run("retry_after_scancel", time.monotonic() - bg.t0, out, returncode=rc)
    assert rc == 0, out[-6000:]

    tiles = _records(work, "tile")
    assert len(tiles) == 2, [t["SLURM_JOB_ID"] for t in tiles]
    killed, retried = tiles
    assert killed["SLURM_JOB_ID"] == first["SLURM_JOB_ID"]
    assert "JobState=CANCELLED" in _scontrol_job(killed["SLURM_JOB_ID"])
    assert _mem_mb(killed["MinMemoryNode"]) == 4000  # attempt 1
    assert _mem_mb(retried["MinMemoryNode"]) == 8000  # attempt 2: "4000 * attempt"
    assert retried["SLURM_JOB_PARTITION"] == _cpu_partition()
    assert "JobState=COMPLETED" in _scontrol_job(retried["SLURM_JOB_ID"])
    assert stats["jobs_submitted"] == 4  # tile x2, features, fusion_train
    assert (work / "out" / "model.txt").exists()


@pytest.mark.slurm
def test_cancelled_training_resumes_from_checkpoint_on_rerun(ci_profile, tmp_path):
    work = tmp_path / "work"
    epochs = 6
    # --retries 0: the cancelled job fails the run, so the *rerun* has to resume it
    # (with the profile's retries the same resume happens inside the first run).
    cmd = _snakemake_cmd(ci_profile, work, "--retries", "0", "--config", f"epochs={epochs}", "epoch_seconds=2")
    ledger = work / "state" / "train" / "epochs.log"
    ckpt = work / "state" / "train" / "checkpoint.json"

    bg = Background(cmd, tmp_path / "run1.log")
    _wait_for(lambda: ledger.exists() and len(ledger.read_text().splitlines()) >= 2, 300,
              "two finished training epochs", bg)
    (train1,) = _records(work, "fusion_train")
    subprocess.run(["scancel", train1["SLURM_JOB_ID"]], check=True)
    rc1 = bg.wait(timeout=300)
    _record_run("training_cancelled", time.monotonic() - bg.t0, bg.output, returncode=rc1)
    assert rc1 != 0, "the run with the cancelled training job should fail"
    assert "JobState=CANCELLED" in _scontrol_job(train1["SLURM_JOB_ID"])
    saved = json.loads(ckpt.read_text())
    assert saved["reason"] == "SIGTERM" and saved["job"] == train1["SLURM_JOB_ID"], saved
    assert 2 <= saved["epoch"] < epochs, saved
    assert not (work / "out" / "model.txt").exists()

    before = {p: (work / p).stat().st_mtime_ns for p in ("out/tiles.txt", "out/features.txt")}
    n_tile, n_feat = len(_records(work, "tile")), len(_records(work, "features"))

    res, stats = _run("training_resumed", cmd, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert stats["jobs_submitted"] == 1, out[-6000:]  # only fusion_train
    assert {p: (work / p).stat().st_mtime_ns for p in before} == before  # nothing upstream redone
    assert (len(_records(work, "tile")), len(_records(work, "features"))) == (n_tile, n_feat)

    train1, train2 = _records(work, "fusion_train")
    lines = [dict(kv.split("=") for kv in line.split()) for line in ledger.read_text().splitlines()]
    assert [int(d["epoch"]) for d in lines] == list(range(epochs)), lines  # every epoch exactly once
    by_job = {d["job"] for d in lines[: saved["epoch"]]}, {d["job"] for d in lines[saved["epoch"]:]}
    assert by_job == ({train1["SLURM_JOB_ID"]}, {train2["SLURM_JOB_ID"]}), lines
    log = (work / "logs" / "train.log").read_text()
    assert f"resuming from checkpoint: {saved['epoch']}/{epochs} epochs done" in log, log
    assert (work / "out" / "model.txt").read_text().startswith(f"model trained for {epochs} epochs")


@pytest.mark.slurm
def test_cancelled_training_is_resumed_by_the_profile_retry(ci_profile, tmp_path):
    """Same cancellation, the user profile's `retries` as is: the retry resumes within the run."""
    work = tmp_path / "work"
    epochs = 5
    ledger = work / "state" / "train" / "epochs.log"
    bg = Background(_snakemake_cmd(ci_profile, work, "--config", f"epochs={epochs}", "epoch_seconds=2"),
                    tmp_path / "run.log")
    _wait_for(lambda: ledger.exists() and len(ledger.read_text().splitlines()) >= 2, 300,
              "two finished training epochs", bg)
    (first,) = _records(work, "fusion_train")
    subprocess.run(["scancel", first["SLURM_JOB_ID"]], check=True)
    rc = bg.wait(timeout=600)
    stats = _record_run("training_cancelled_retried", time.monotonic() - bg.t0, bg.output, returncode=rc)
    assert rc == 0, bg.output[-6000:]
    assert stats["jobs_submitted"] == 4  # tile, features, fusion_train x2
    first, second = _records(work, "fusion_train")
    assert second["SLURM_JOB_PARTITION"] == first["SLURM_JOB_PARTITION"] == _expected_gpu_routing()["fusion_train"][1]
    lines = [dict(kv.split("=") for kv in line.split()) for line in ledger.read_text().splitlines()]
    assert [int(d["epoch"]) for d in lines] == list(range(epochs)), lines
    assert {d["job"] for d in lines} == {first["SLURM_JOB_ID"], second["SLURM_JOB_ID"]}, lines
    assert "resuming from checkpoint" in (work / "logs" / "train.log").read_text()


# --------------------------------------------------------------------------- full workflow
def _copy_repo(dst: Path) -> Path:
    shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(
        ".venv", ".git", "results", ".snakemake", "__pycache__", ".pytest_cache", "benchmarks", "*.egg-info"))
    shared = REPO.parent / "shared"  # config may name files in ../shared (local weights, references)
    if shared.is_dir() and not (dst.parent / "shared").exists():
        (dst.parent / "shared").symlink_to(shared)
    return dst


IGNORED_JSON_KEYS = re.compile(r"(seconds|per_second|time|date|host|duration)", re.I)


RTOL = float(os.environ.get("MORPHOMOL_SLURM_RTOL", 1e-4))  # local vs SLURM: thread counts differ


def _same(a, b, rtol=RTOL, atol=1e-8) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = {k for k in a.keys() | b.keys() if not IGNORED_JSON_KEYS.search(str(k))}
        return all(k in a and k in b and _same(a[k], b[k], rtol, atol) for k in keys)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y, rtol, atol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rtol, abs_tol=atol)
        except TypeError:
            return False
    return a == b


def _compare_results(local: Path, slurm: Path) -> list[str]:
    """Differences between two results/ trees (tables and metadata compared by value)."""
    import pandas as pd

    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*")
                if p.is_file() and p.suffix != ".log"
                and not {"logs", "benchmarks"} & set(p.relative_to(root).parts)}  # run records: times, RSS

    fl, fs = files(local), files(slurm)
    problems = [f"only in local run: {sorted(fl - fs)[:20]}"] if fl - fs else []
    problems += [f"only in slurm run: {sorted(fs - fl)[:20]}"] if fs - fl else []
    for rel in sorted(fl & fs):
        a, b = local / rel, slurm / rel
        if a.read_bytes() == b.read_bytes():
            continue
        try:
            if a.suffix == ".json":
                ok = _same(json.loads(a.read_text()), json.loads(b.read_text()))
            elif a.suffix in (".csv", ".tsv", ".parquet"):
                read = pd.read_parquet if a.suffix == ".parquet" else (
                    lambda p: pd.read_csv(p, sep="\t" if p.suffix == ".tsv" else ","))
                da, db = read(a), read(b)
                cols = [c for c in da.columns if not IGNORED_JSON_KEYS.search(str(c))]
                pd.testing.assert_frame_equal(da[cols], db[cols], rtol=RTOL, check_dtype=False)
                ok = True
            elif a.suffix in (".md", ".tex", ".txt"):
                ok = a.with_suffix(".csv").exists()  # rendered tables: values compared via the CSV
            else:
                continue  # binary stores/images/weights: presence checked above, values via tables
        except AssertionError:
            ok = False
        if not ok:
            problems.append(f"differs: {rel}")
    return problems


@pytest.mark.slurm
@pytest.mark.slow
def test_full_demo_workflow_on_slurm_matches_local_run(ci_profile, tmp_path):
    """The project's real Snakefile via `--profile` (CI variant of profiles/slurm) vs a local run.

    MORPHOMOL_SLURM_TARGET limits both runs to targets (rule names or files, space-separated),
    default: the whole demo. MORPHOMOL_SLURM_TIMEOUT (s, per run), MORPHOMOL_SLURM_RTOL (value tolerance).
    """
    if not (REPO / "Snakefile").exists():
        pytest.fail("no Snakefile in the repository")
    target = [t for t in os.environ.get("MORPHOMOL_SLURM_TARGET", "").split() if t]
    timeout = float(os.environ.get("MORPHOMOL_SLURM_TIMEOUT", 3000))
    local = _copy_repo(tmp_path / "local")
    slurm = _copy_repo(tmp_path / "slurm")

    res_l, _ = _run("e2e_local", [sys.executable, "-m", "snakemake", "--cores", "2", "--directory", str(local),
                                  "-s", str(local / "Snakefile"), *target], timeout=timeout, where="local")
    assert res_l.returncode == 0, (res_l.stdout + res_l.stderr)[-6000:]

    res_s, stats = _run("e2e_slurm", _snakemake_cmd(ci_profile, slurm, *target, snakefile=slurm / "Snakefile"),
                        timeout=timeout, target=" ".join(target) or "all")
    out = res_s.stdout + res_s.stderr
    assert res_s.returncode == 0, out[-6000:]
    assert stats["jobs_submitted"] > 0, out[-6000:]
    # GPU rules of the real workflow went to the partition of their gpu_model
    routing = _expected_gpu_routing()
    for m in re.finditer(r"Auto-selected partition '([^']+)' for job (\w+)", out):
        partition, rule = m.groups()
        rule = "features" if rule.startswith("features_") else rule  # generated group rules (features.smk)
        expected = routing[rule][1] if rule in routing else _cpu_partition()
        assert partition == expected, (rule, partition, expected)

    problems = _compare_results(local / "results", slurm / "results")
    assert not problems, "\n".join(problems)
