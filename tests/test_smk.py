"""The Snakemake boundary (morphomol.smk.run): appended logs with attempt headers, one-line errors for
bad input and a full disk, and a rerun that fails says the previous outputs were removed."""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace

import pytest

from morphomol.errors import InputError
from morphomol.smk import run


class _Named(list):
    def __init__(self, items=(), **named):
        super().__init__(list(items) + list(named.values()))
        self._named = named

    def items(self):
        return self._named.items()

    def __getattr__(self, k):
        try:
            return self._named[k]
        except KeyError:
            raise AttributeError(k) from None


def fake_smk(log: Path, attempt: int = 1, out: Path | None = None) -> SimpleNamespace:
    return SimpleNamespace(log=[str(log)], rule="tile", attempt=attempt, threads=1,
                           wildcards=_Named(cohort="c", sample="s"), output=_Named([str(out or log.with_suffix(".out"))]))


def test_log_is_appended_per_attempt(tmp_path):
    log = tmp_path / "logs" / "tile" / "s.log"
    run(lambda smk: None, fake_smk(log, attempt=1))
    log.unlink()  # Snakemake deletes a job's declared log before every run
    with pytest.raises(SystemExit) as exc:
        run(lambda smk: (_ for _ in ()).throw(InputError("bad value", file="x.tsv", field="he_mpp")),
            fake_smk(log, attempt=2))
    assert exc.value.code == 1
    text = log.read_text()
    assert "rule tile, attempt 1" in text and "rule tile, attempt 2" in text  # the first attempt's lines are kept
    assert text.index("attempt 1") < text.index("rule tile done in") < text.index("attempt 2")
    assert "x.tsv, field 'he_mpp': bad value" in text


def test_failed_rerun_says_previous_outputs_were_removed(tmp_path):
    log = tmp_path / "s.log"
    run(lambda smk: None, fake_smk(log))  # finished once: outputs existed
    log.unlink()

    def fail(smk):
        raise InputError("tiling.min_transcripts leaves zero tiles", field="tiling.min_transcripts")

    rerun = fake_smk(log)
    rerun.params = _Named(min_transcripts=5)  # rerun for a params change: Snakemake removed the outputs
    with pytest.raises(SystemExit):
        run(fail, rerun)
    last = log.read_text().strip().splitlines()[-1]
    assert "zero tiles" in last and "removed its previous outputs" in last and "README" in last


def test_first_failure_does_not_talk_about_removed_outputs(tmp_path):
    log = tmp_path / "s.log"
    with pytest.raises(SystemExit):
        run(lambda smk: (_ for _ in ()).throw(InputError("nope")), fake_smk(log))
    assert "removed" not in log.read_text()


def test_disk_full_is_one_line_naming_path_and_free_space(tmp_path):
    log = tmp_path / "s.log"
    out = tmp_path / "samples" / "s" / "tiles.zarr"

    def full(smk):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "images" / "c" / "0"))

    with pytest.raises(SystemExit) as exc:
        run(full, fake_smk(log, out=out))
    assert exc.value.code == 1
    errors = [ln for ln in log.read_text().splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and "disk full while writing" in errors[0] and "tiles.zarr" in errors[0]
    assert "free space there" in errors[0] and "GB" in errors[0]
    assert "Traceback" not in log.read_text()


def test_disk_full_wrapped_by_a_library_is_still_one_line(tmp_path):
    log = tmp_path / "s.log"

    def full(smk):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("zarr could not write chunk") from inner

    with pytest.raises(SystemExit):
        run(full, fake_smk(log))
    assert "disk full while writing" in log.read_text()


def test_bugs_keep_their_traceback(tmp_path):
    with pytest.raises(ZeroDivisionError):
        run(lambda smk: 1 / 0, fake_smk(tmp_path / "s.log"))


def test_real_snakemake_rerun_keeps_earlier_attempts_and_says_outputs_were_removed(tmp_path):
    """Through Snakemake itself (which deletes the declared log before each run): a job that finished,
    rerun after a params change and failing (retried once), ends with a log holding the finished run,
    both failed attempts and the 'previous outputs removed' message."""
    import subprocess
    import sys

    (tmp_path / "Snakefile").write_text(
        'rule a:\n    output: "out.txt"\n    log: "logs/a.log"\n    params: fail=config.get("fail", 0)\n'
        '    script: "a.py"\n')
    (tmp_path / "a.py").write_text(
        "from morphomol.errors import InputError\nfrom morphomol.smk import run\n\n"
        "def main(smk):\n    if smk.params.fail:\n        raise InputError('bad value', field='x')\n"
        "    open(smk.output[0], 'w').write('ok')\n\nrun(main)\n")
    smk = [str(Path(sys.executable).with_name("snakemake")), "--cores", "1", "-d", str(tmp_path), "-s",
           str(tmp_path / "Snakefile")]
    assert subprocess.run(smk, capture_output=True, text=True, timeout=300).returncode == 0
    res = subprocess.run([*smk, "--config", "fail=1", "--retries", "1"], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    text = (tmp_path / "logs" / "a.log").read_text()
    headers = [i for i, line in enumerate(text.splitlines()) if line.startswith("===== rule a, attempt")]
    assert len(headers) == 3, text  # the finished run, the failed rerun and its retry
    assert text.index("rule a done in") < text.index("bad value") and text.count("bad value") == 2
    assert text.strip().splitlines()[-1].endswith("see README 'Keeping results')") and "bad value" in text
    assert not (tmp_path / "out.txt").exists()
