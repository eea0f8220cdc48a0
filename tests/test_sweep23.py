"""Issue 23's bad-input and fault sweep, the cases of the command line, tools, readers, registration and
utilities: each test reproduces one reported case (a traceback, an unclear message, a silent wrong
result, a permission) with real files and real libraries, and asserts the behaviour the issue asks for."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import stat
import struct
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from morphomol.cli import main
from morphomol.errors import InputError

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
SFE = DATA / "xenium_mini_sfe"
XOA1 = DATA / "xenium_small_xoa1"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------- 1. permissions
def test_checkpoints_are_0644_under_umask_022(tmp_path):
    """Issue 23, 7: safetensors writes its files 0600; a checkpoint is readable like every other output."""
    import torch

    from morphomol.train.checkpoint import save_checkpoint

    with umask(0o022):
        save_checkpoint(torch.nn.Linear(3, 2), tmp_path / "run" / "checkpoint.safetensors",
                        tmp_path / "run" / "checkpoint.json", {"setting": "s"})
    assert mode(tmp_path / "run" / "checkpoint.safetensors") == 0o644
    assert mode(tmp_path / "run" / "checkpoint.json") == 0o644


def test_slides_checkpoint_numpy_safetensors_is_0644(tmp_path):
    """The slides study saves with safetensors.numpy inside atomic_path (run.py): the same rule."""
    from safetensors.numpy import save_file

    from morphomol.util.atomic import atomic_path

    with umask(0o022), atomic_path(tmp_path / "checkpoint.safetensors") as tmp:
        save_file({"w": np.zeros(3, np.float32)}, str(tmp))
    assert mode(tmp_path / "checkpoint.safetensors") == 0o644


def test_atomic_outputs_follow_the_umask_files_and_trees(tmp_path):
    """Any atomic output (a file from mkstemp, a directory tree from mkdtemp or a library writing 0600)
    gets what a plain open()/mkdir() would get under the umask; bits are only added."""
    import tempfile

    from morphomol.util.atomic import atomic_path

    with umask(0o027):
        with atomic_path(tmp_path / "a.bin") as tmp:
            fd, name = tempfile.mkstemp(dir=tmp_path)
            os.close(fd)
            os.replace(name, tmp)
        with atomic_path(tmp_path / "store.zarr") as tmp:
            made = Path(tempfile.mkdtemp(dir=tmp_path))
            (made / "sub").mkdir()
            (made / "sub" / "0.0").write_bytes(b"x")
            os.chmod(made / "sub" / "0.0", 0o600)
            (made / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(made / "run.sh", 0o700)
            os.replace(made, tmp)
    assert mode(tmp_path / "a.bin") == 0o640
    assert mode(tmp_path / "store.zarr") == 0o750 and mode(tmp_path / "store.zarr" / "sub") == 0o750
    assert mode(tmp_path / "store.zarr" / "sub" / "0.0") == 0o640
    assert mode(tmp_path / "store.zarr" / "run.sh") == 0o750  # executable stays executable


# ------------------------------------------------------------------------- 2. EFBIG
def test_file_size_limit_is_one_line_like_a_full_disk(tmp_path):
    """`ulimit -f` -> OSError EFBIG: one line naming the file and the limit, not a traceback."""
    log = tmp_path / "logs" / "tile" / "s.log"
    out = tmp_path / "out.bin"
    script = tmp_path / "efbig.py"
    script.write_text(textwrap.dedent(f"""
        import resource
        from types import SimpleNamespace
        from morphomol.smk import run
        from morphomol.util.atomic import atomic_path

        class Named(list):
            def items(self):
                return {{}}.items()

        def main(smk):
            with atomic_path({str(out)!r}) as tmp, open(tmp, "wb") as fh:
                for _ in range(8):
                    fh.write(b"0" * (1 << 20))

        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        run(main, SimpleNamespace(log=[{str(log)!r}], rule="tile", attempt=1, threads=1, wildcards=Named(),
                                  output=[{str(out)!r}]))
    """))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    text = log.read_text()
    errors = [ln for ln in text.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and "file too large while writing" in errors[0] and "ulimit -f: 0.001 GB" in errors[0]
    assert "Traceback" not in text and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.bin.tmp-")]  # the temporary was removed


# ------------------------------------------------------------------------- 3. predict
def test_predict_min_mae_is_a_clear_error(tmp_path):
    """`predict --setting min_mae`: the Min-MAE baseline has no model (was KeyError: 'setting_fields')."""
    from morphomol.tools.predict import predict_fusion

    run = tmp_path / "fusion" / "runs" / "min_mae" / "fold0"
    run.mkdir(parents=True)
    # what studies.fusion.baselines.run_min_mae writes
    (run / "checkpoint.json").write_text(json.dumps({"setting": "min_mae", "fold": 0, "kind": "min_mae",
                                                     "source_gene": {"G1": "C1"}, "core_genes": ["C1"],
                                                     "addon_genes": ["G1"]}))
    with pytest.raises(InputError, match="Min-MAE baseline: it has no model") as exc:
        predict_fusion(run, [])
    assert str(run / "checkpoint.json") in str(exc.value) and "field 'setting'" in str(exc.value)


@pytest.mark.parametrize("flag,value", [("--setting", "../../../etc"), ("--setting", ".."),
                                        ("--cohort", "a/b"), ("--on", ".hidden")])
def test_predict_names_are_validated_like_sample_ids(tmp_path, monkeypatch, capsys, flag, value):
    monkeypatch.chdir(tmp_path)
    args = {"--cohort": "demo", "--setting": "expr_mlp", "--on": "demo", flag: value}
    rc = main(["predict", *[x for kv in args.items() for x in kv], "--config", str(tmp_path / "none.yaml")])
    err = capsys.readouterr().err
    assert rc == 1 and f"field '{flag}'" in err and repr(value) in err and "not a plain name" in err


# ------------------------------------------------------------------------- 4. init
def _bundle_folder(root: Path) -> Path:
    b = root / "data" / "run1" / "xenium"
    b.mkdir(parents=True)
    shutil.copy(XOA1 / "experiment.xenium", b / "experiment.xenium")
    return root / "data"


@pytest.mark.parametrize("name", ["..", ".", "../escape", ".hidden", "a/b", ""])
def test_init_refuses_names_that_are_not_plain(tmp_path, capsys, name):
    data = _bundle_folder(tmp_path)
    out = tmp_path / "conf" / "cohorts"
    out.mkdir(parents=True)
    before = sorted(p for p in tmp_path.rglob("*"))
    rc = main(["init", str(data), "--name", name, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "field '--name'" in err and "not a plain name" in err
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written anywhere


def test_init_bad_patient_regex_names_the_flag(tmp_path, capsys):
    data = _bundle_folder(tmp_path)
    rc = main(["init", str(data), "--name", "c", "--out", str(tmp_path / "o"), "--patient-regex", "("])
    err = capsys.readouterr().err
    assert rc == 1 and "field '--patient-regex'" in err and "not a valid regular expression" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------- 5. landmarks
def test_repeated_keypoint_rows_are_one_landmark(tmp_path, caplog):
    """A keypoints CSV with repeated rows: the repeats are dropped with a warning, and the fit and its
    LOO RMS are those of the distinct landmarks (repeats made the LOO RMS look smaller)."""
    from morphomol.io.landmarks import read_keypoints
    from morphomol.registration.fit import robust_fit

    rng = np.random.default_rng(3)
    fixed = rng.uniform(0, 2000, (8, 2))
    m = np.array([[0.9, 0.1, 40.0], [-0.1, 0.95, -25.0]])
    moving = fixed @ m[:, :2].T + m[:, 2] + rng.normal(0, 3.0, (8, 2))
    rows = [[f"{a:.4f}", f"{b:.4f}", f"{c:.4f}", f"{d:.4f}"] for (a, b), (c, d) in zip(fixed, moving)]

    def write(path: Path, rr: list[list[str]]) -> Path:
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["fixedX", "fixedY", "alignmentX", "alignmentY"])
            w.writerows(rr)
        return path

    clean = read_keypoints(write(tmp_path / "clean.csv", rows))
    with caplog.at_level(logging.WARNING, logger="morphomol"):
        dup = read_keypoints(write(tmp_path / "dup.csv", rows + [rows[0], rows[3], rows[3]]))
    assert len(dup) == len(clean) == 8
    np.testing.assert_array_equal(dup.fixed_px, clean.fixed_px)
    np.testing.assert_array_equal(dup.rows, np.arange(2, 10))
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "3 repeated landmark row(s) dropped" in msg and "line 10 repeats line 2" in msg and "dup.csv" in msg
    a = robust_fit(clean.moving_px, clean.fixed_px, method="none")
    b = robust_fit(dup.moving_px, dup.fixed_px, method="none")
    assert a.rms_um == pytest.approx(b.rms_um, rel=1e-12)


def test_same_fixed_point_with_another_region_is_not_a_repeat(tmp_path):
    from morphomol.io.landmarks import read_keypoints

    p = tmp_path / "kp.csv"
    p.write_text("fixedX,fixedY,alignmentX,alignmentY,region\n1,2,3,4,A\n1,2,3,4,B\n5,6,7,8,A\n")
    assert len(read_keypoints(p)) == 3


# ------------------------------------------------------------------------- 6. huge declared TIFF
def sparse_tiff(path: Path, width: int, height: int, tile: int = 1024, mpp: float = 0.5) -> Path:
    """A classic TIFF declaring ``width`` x ``height`` RGB px in tiles, every tile absent (offset and byte
    count 0): a few hundred KB that decode to gigapixels (the reported 4.9 MB 200,000 px file)."""
    ntiles = -(-width // tile) * -(-height // tile)
    entries: list[tuple[int, int, int, bytes]] = []

    def short(tag: int, *v: int) -> None:
        entries.append((tag, 3, len(v), struct.pack(f"<{len(v)}H", *v)))

    def long_(tag: int, *v: int) -> None:
        entries.append((tag, 4, len(v), struct.pack(f"<{len(v)}I", *v)))

    def rational(tag: int, num: int, den: int) -> None:
        entries.append((tag, 5, 1, struct.pack("<II", num, den)))

    long_(256, width)
    long_(257, height)
    short(258, 8, 8, 8)
    short(259, 1)
    short(262, 2)
    short(277, 3)
    rational(282, int(round(1e4 / mpp)), 1)
    rational(283, int(round(1e4 / mpp)), 1)
    short(284, 1)
    short(296, 3)  # centimetre
    short(322, tile)
    short(323, tile)
    zeros = np.zeros(ntiles, "<u4").tobytes()
    entries += [(324, 4, ntiles, zeros), (325, 4, ntiles, zeros)]
    entries.sort(key=lambda e: e[0])
    data_off = 8 + 2 + 12 * len(entries) + 4
    ifd, data = [struct.pack("<H", len(entries))], []
    for tag, typ, count, payload in entries:
        if len(payload) <= 4:
            ifd.append(struct.pack("<HHI", tag, typ, count) + payload.ljust(4, b"\0"))
        else:
            ifd.append(struct.pack("<HHII", tag, typ, count, data_off + sum(len(d) for d in data)))
            data.append(payload + (b"\0" if len(payload) % 2 else b""))
    ifd.append(struct.pack("<I", 0))
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + b"".join(ifd) + b"".join(data))
    return path


def test_slide_tiler_refuses_a_huge_declared_tiff_quickly_under_a_memory_limit(tmp_path):
    """200,000 x 200,000 px declared in a small tiled TIFF without a pyramid: the slides tiler stops with
    one InputError naming the file, under a 3 GB address-space limit (it used to grow past 6 GB)."""
    tif = sparse_tiff(tmp_path / "bomb.tif", 200_000, 200_000)
    assert tif.stat().st_size < 1_000_000
    script = tmp_path / "tile.py"
    script.write_text(textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
        from morphomol.errors import InputError
        from morphomol.studies.slides.config import SlideTilingConfig
        from morphomol.studies.slides.tiles import tile_slide
        try:
            tile_slide(slide_path={str(tif)!r}, sample="S1", patient="P1", out_units={str(tmp_path / "u.h5ad")!r},
                       out_store={str(tmp_path / "images.zarr")!r}, cfg=SlideTilingConfig())
        except InputError as exc:
            print("INPUT_ERROR", exc.message)
            sys.exit(3)
    """))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 3, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    assert str(tif) in res.stdout and "200000 x 200000 px" in res.stdout and "gigapixels" in res.stdout
    assert "pyramid" in res.stdout
    assert not (tmp_path / "u.h5ad").exists() and not (tmp_path / "images.zarr").exists()


def test_thumbnail_and_open_refuse_absurd_sizes(tmp_path):
    from morphomol.io.he import open_slide

    with open_slide(sparse_tiff(tmp_path / "big.tif", 200_000, 200_000)) as slide:
        with pytest.raises(InputError, match="thumbnail of at most 1024 px would decode 40.0 gigapixels"):
            slide.thumbnail(1024)
    with pytest.raises(InputError, match=r"declares 1500000 x 2048 px at level 0") as exc:
        open_slide(sparse_tiff(tmp_path / "wide.tif", 1_500_000, 2048, tile=4096))
    assert "wide.tif" in str(exc.value) and "field 'dimensions'" in str(exc.value)


def test_large_thumbnail_is_streamed_in_strips_and_equals_the_one_read(tmp_path, monkeypatch):
    """A level over STRIP_PX is read in strips; the thumbnail is the same as the one-read path (up to
    the resampling at strip seams)."""
    import tifffile

    import morphomol.io.he as he

    rng = np.random.default_rng(0)
    img = (rng.integers(0, 255, (64, 48, 3)).repeat(20, 0).repeat(20, 1)).astype(np.uint8)  # 1280 x 960
    tifffile.imwrite(tmp_path / "he.tif", img, tile=(256, 256), photometric="rgb",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with he.open_slide(tmp_path / "he.tif") as slide:
        one, ds1 = slide.thumbnail(240)
        monkeypatch.setattr(he, "STRIP_PX", 960 * 100)  # ~100 level rows per strip: 13 strips
        strips, ds2 = slide.thumbnail(240)
    assert one.shape == strips.shape == (240, 180, 3) and ds1 == ds2
    diff = np.abs(one.astype(int) - strips.astype(int))
    assert np.median(diff) == 0 and diff.mean() < 2.0


# ------------------------------------------------------------------------- 7. !!python in config.yaml
def test_snakemake_dry_run_names_a_python_tag_in_config(tmp_path):
    """`snakemake -n` with a `!!python` tag in config.yaml: the message of check-config (file, line, the
    tag), not Snakemake's generic 'not valid JSON or YAML'."""
    wd = tmp_path / "wd"
    wd.mkdir()
    shutil.copy(REPO / "Snakefile", wd / "Snakefile")
    shutil.copytree(REPO / "workflow", wd / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    (wd / "config").mkdir()
    (wd / "config" / "config.yaml").write_text("cohorts: {}\nseed: !!python/object/apply:os.system ['touch pwned']\n")
    res = subprocess.run([SNAKEMAKE, "-n", "--cores", "1"], cwd=wd, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "config/config.yaml: not valid YAML" in out and "python/object/apply:os.system" in out and "line 2" in out
    assert "not valid JSON or YAML" not in out and not (wd / "pwned").exists()


# ------------------------------------------------------------------------- 8. resume.pt warning
class Custom:
    """A class a weights-only load refuses."""


def test_refused_resume_file_warning_never_advises_weights_only_false(tmp_path, caplog):
    import torch

    from morphomol.train.resume import load_resume

    resume = tmp_path / "resume.pt"
    torch.save({"state": Custom(), "fingerprint": {}}, resume)  # a pickled object, not plain data
    with caplog.at_level(logging.WARNING, logger="morphomol"):
        assert load_resume(resume, {}) is None
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "cannot read resume state" in msg and "Custom" in msg and "never loaded" in msg
    assert "weights_only=False" not in msg and "weights_only" not in msg and "safe_globals" not in msg
    assert (tmp_path / "resume.pt.unreadable").exists()


def test_refused_weights_file_never_advises_weights_only_false(tmp_path):
    import torch

    from morphomol.encoders import create_encoder

    torch.save({"x": Custom()}, tmp_path / "w.pt")
    with pytest.raises(InputError) as exc:
        create_encoder("vit_s", tmp_path / "w.pt", embed_dim=32, depth=2, num_heads=2)
    assert "refusing to load" in str(exc.value) and "weights_only=False" not in str(exc.value)
    assert "safe_globals" not in str(exc.value)


# ------------------------------------------------------------------------- 9. "Snakemake removed its outputs"
def test_outputs_removed_note_only_when_snakemake_removed_them(tmp_path):
    """A job that had finished, rerun because the user deleted its output (same params and inputs), then
    failing: the log must not claim that Snakemake removed the previous outputs. After a params change
    (Snakemake removes the existing output before rerunning), it still says so."""
    (tmp_path / "in.txt").write_text("x")
    (tmp_path / "Snakefile").write_text(
        'rule a:\n    input: "in.txt"\n    output: "out.txt"\n    log: "logs/a.log"\n'
        '    params: level=config.get("level", 0)\n    script: "a.py"\n')
    (tmp_path / "a.py").write_text(
        "import os\nfrom morphomol.errors import InputError\nfrom morphomol.smk import run\n\n"
        "def main(smk):\n    if os.path.exists('fail.flag'):\n        raise InputError('bad value', field='x')\n"
        "    open(smk.output[0], 'w').write('ok')\n\nrun(main)\n")
    smk = [SNAKEMAKE, "--cores", "1", "-d", str(tmp_path), "-s", str(tmp_path / "Snakefile")]
    assert subprocess.run(smk, capture_output=True, text=True, timeout=300).returncode == 0
    (tmp_path / "out.txt").unlink()  # the user deletes the output
    (tmp_path / "fail.flag").write_text("")
    assert subprocess.run(smk, capture_output=True, text=True, timeout=300).returncode != 0
    last = (tmp_path / "logs" / "a.log").read_text().strip().splitlines()[-1]
    assert "bad value" in last and "removed its previous outputs" not in last
    # finished again, then rerun for a params change: Snakemake removes out.txt itself
    (tmp_path / "fail.flag").unlink()
    assert subprocess.run(smk, capture_output=True, text=True, timeout=300).returncode == 0
    (tmp_path / "fail.flag").write_text("")
    assert subprocess.run([*smk, "--config", "level=1"], capture_output=True, text=True, timeout=300).returncode != 0
    last = (tmp_path / "logs" / "a.log").read_text().strip().splitlines()[-1]
    assert "bad value" in last and "Snakemake removed its previous outputs" in last


# ------------------------------------------------------------------------- 10. empty transcripts
def test_zero_row_transcripts_file_is_empty_not_panel_genes_absent(tmp_path):
    from morphomol.io.xenium import XeniumBundle
    from morphomol.qc import check_panel_genes

    d = tmp_path / "bundle"
    d.mkdir()
    shutil.copy(XOA1 / "experiment.xenium", d / "experiment.xenium")
    table = pq.read_table(SFE / "transcripts.parquet")
    pq.write_table(table.slice(0, 0), d / "transcripts.parquet")
    b = XeniumBundle(d)
    with pytest.raises(InputError, match=r"transcripts file is empty") as exc:
        check_panel_genes(b.feature_names(), ["AKT1", "CD3E"], "s1", b.transcripts_path)  # what qc_sample does
    assert str(d / "transcripts.parquet") in str(exc.value) and "absent" not in str(exc.value)
