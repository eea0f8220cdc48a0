"""Feature extraction over tiles.zarr / tokens.zarr with tiny encoders, atomic output, the
features-store reader/writer (:mod:`morphomol.data.features`), and the `features` rule run through
real Snakemake."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from morphomol.config.sections import EncoderConfig, FeaturesConfig, ViTConfig
from morphomol.data.features import feature_rows, open_features_writer, read_features, write_features
from morphomol.encoders import create_encoder, save_weights
from morphomol.errors import InputError
from morphomol.features import extract_features, extract_features_for, feature_job_args

REPO = Path(__file__).resolve().parents[1]
TINY = dict(embed_dim=32, depth=2, num_heads=2)


def _tiles(path: Path, n: int = 20, chunk: int = 8, seed: int = 0) -> np.ndarray:
    imgs = np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
    g = zarr.open_group(str(path), mode="w")
    a = g.create_array("images", shape=imgs.shape, chunks=(chunk, 224, 224, 3), dtype="uint8")
    a[:] = imgs
    g.attrs.update({"sample": "s1", "tile_px": 512, "mpp": 0.5, "stride": 256})
    return imgs


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, np.ndarray]:
    p = tmp_path_factory.mktemp("tiles") / "tiles.zarr"
    return p, _tiles(p)


def test_features_match_direct_forward(store, tmp_path):
    path, imgs = store
    out = tmp_path / "f.zarr"
    summary = extract_features(path, out, "vit_s", None, 6, "cpu", TINY, patch_tokens=True)
    assert summary["n_tiles"] == 20 and summary["dim"] == 32
    feats, attrs = read_features(out)
    assert feats.shape == (20, 32) and feats.dtype == np.float32
    assert attrs["encoder"] == "vit_s" and attrs["dim"] == 32 and attrs["n_tiles"] == 20
    assert attrs["weights_sha256"] == "random-init:seed=0" and attrs["tiles_store"] == str(path)
    enc = create_encoder("vit_s", **TINY)
    with torch.inference_mode():
        want = enc(imgs).numpy()
        want_tok = enc.forward_tokens(imgs[:3]).numpy()
    np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-5)
    tok = zarr.open_group(str(out), mode="r")["tokens"]
    assert tok.shape == (20, 196, 32) and tok.dtype == np.float16
    np.testing.assert_allclose(tok[:3].astype(np.float32), want_tok, rtol=1e-2, atol=1e-2)
    # same inputs -> same features, whatever the batch size
    out2 = tmp_path / "f2.zarr"
    extract_features(path, out2, "vit_s", None, 16, "cpu", TINY)
    np.testing.assert_allclose(read_features(out2)[0], feats, rtol=1e-4, atol=1e-5)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary leftovers


def test_weights_hash_and_overwrite(store, tmp_path):
    path, _ = store
    enc = create_encoder("vit_s", seed=7, **TINY)
    w = save_weights(enc, tmp_path / "vit.safetensors")
    out = tmp_path / "f.zarr"
    extract_features(path, out, "vit_s", w, 32, "cpu", TINY)
    feats, attrs = read_features(out)
    assert attrs["weights_sha256"] == hashlib.sha256(w.read_bytes()).hexdigest()
    base, _ = read_features(tmp_path / "f.zarr")
    extract_features(path, out, "vit_s", None, 32, "cpu", TINY)  # rerun replaces atomically
    assert not np.allclose(read_features(out)[0], base)


def test_bad_store_and_failure_leave_no_output(store, tmp_path):
    path, _ = store
    bad = tmp_path / "bad.zarr"
    g = zarr.open_group(str(bad), mode="w")
    g.create_array("images", shape=(4, 224, 224), dtype="uint8")
    with pytest.raises(InputError, match="images"):
        extract_features(bad, tmp_path / "o.zarr", "vit_s", None, 4, "cpu", TINY)
    with pytest.raises(InputError, match="not found"):
        extract_features(tmp_path / "missing.zarr", tmp_path / "o.zarr", "vit_s", None, 4, "cpu", TINY)
    assert not (tmp_path / "o.zarr").exists()

    class Boom(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = create_encoder("vit_s", **TINY)
            self.dim, self.calls = 32, 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("GPU fell over")
            return self.inner(x)

    out = tmp_path / "keep.zarr"
    out.mkdir()
    (out / "marker").write_text("user data")
    with pytest.raises(RuntimeError, match="fell over"):
        extract_features(path, out, "vit_s", None, 8, "cpu", encoder=Boom())
    assert (out / "marker").read_text() == "user data"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_expression_encoder_reads_tokens_store(tmp_path):
    from test_encoders import GF_GENES, _write_geneformer

    d = _write_geneformer(tmp_path / "gf")
    counts = np.random.default_rng(1).integers(0, 20, (10, len(GF_GENES))).astype(np.uint32)
    tz = tmp_path / "tokens.zarr"
    g = zarr.open_group(str(tz), mode="w")
    g.create_array("tile_counts", shape=counts.shape, chunks=(4, len(GF_GENES)), dtype="uint32")[:] = counts
    g.attrs.update({"genes": GF_GENES, "grid": 14, "sample": "s1"})
    out = tmp_path / "gf.zarr"
    extract_features(tz, out, "geneformer", d, 3, "cpu")
    feats, attrs = read_features(out)
    enc = create_encoder("geneformer", d)
    with torch.inference_mode():
        want = enc(counts, GF_GENES).numpy()
    np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-5)
    assert attrs["kind"] == "expression" and attrs["dim"] == 16


def test_feature_job_args_from_config():
    feats = FeaturesConfig(batch_size=128, encoders=("vit_s", "uni"), device="auto", patch_tokens=False)
    vit = ViTConfig(embed_dim=96, depth=3, num_heads=3)
    s = feature_job_args("vit_s", EncoderConfig(pooling="mean"), feats, vit)
    assert s["overrides"] == {"embed_dim": 96, "depth": 3, "num_heads": 3, "pooling": "mean"}
    assert s["weights"] is None and s["batch_size"] == 128
    assert s["overrides_field"] == "model.vit" and s["device"] == "auto" and s["patch_tokens"] is False
    u = feature_job_args("uni", EncoderConfig(weights="w/uni.safetensors", batch_size=64, patch_tokens=True),
                         feats, vit)
    assert u["weights"] == "w/uni.safetensors" and u["overrides"] == {} and u["batch_size"] == 64
    assert u["overrides_field"] is None and u["patch_tokens"] is True
    both = feature_job_args("vit_s", EncoderConfig(overrides={"depth": 1}), feats, vit)
    assert both["overrides"] == {"embed_dim": 96, "depth": 1, "num_heads": 3}
    assert both["overrides_field"] == "model.vit or encoders.vit_s.overrides"


def test_bad_model_vit_is_reported_as_model_vit(store, tmp_path):
    path, _ = store
    feats = FeaturesConfig(batch_size=8, encoders=("vit_s",), device="cpu", patch_tokens=False)
    with pytest.raises(InputError, match=r"model\.vit") as exc:
        extract_features_for("vit_s", store=path, out=tmp_path / "f.zarr", encoder=EncoderConfig(), features=feats,
                             vit=ViTConfig(embed_dim=30, depth=1, num_heads=4))
    assert "encoders.vit_s" not in str(exc.value)
    assert not (tmp_path / "f.zarr").exists()
    out = extract_features_for("vit_s", store=path, out=tmp_path / "f.zarr", encoder=EncoderConfig(), features=feats,
                               vit=ViTConfig(**TINY))
    assert out["n_tiles"] == 20 and read_features(tmp_path / "f.zarr")[0].shape == (20, 32)


# ------------------------------------------------------------------ features store reader/writer


def test_read_features_rows_and_errors(tmp_path):
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    p = write_features(tmp_path / "s1.zarr", x, encoder="vit_s", chunk_rows=4, arch={"depth": 2})
    feats, attrs = read_features(p)
    np.testing.assert_array_equal(feats, x)
    assert attrs["encoder"] == "vit_s" and attrs["dim"] == 3 and attrs["n_tiles"] == 10
    assert attrs["arch"] == {"depth": 2}
    rows = np.array([7, 2, 2, 9])  # the order given, duplicates allowed
    got, _ = read_features(p, rows)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x[rows])
    assert read_features(p, np.array([], dtype=np.int64))[0].shape == (0, 3)
    for bad, shown in (([3, 10], "10"), ([-1, 2], "-1")):
        with pytest.raises(InputError, match=f"tile index {shown} out of range \\(10 rows\\)") as exc:
            read_features(p, np.array(bad))
        assert "s1.zarr" in str(exc.value)
    with pytest.raises(InputError, match="integer"):
        read_features(p, np.array([0.5]))
    with pytest.raises(InputError, match="store not found") as exc:
        read_features(tmp_path / "missing.zarr")
    assert "missing.zarr" in str(exc.value)
    zarr.open_group(str(tmp_path / "empty.zarr"), mode="w").create_array("other", shape=(2,), dtype="uint8")
    with pytest.raises(InputError, match="no 'features' array") as exc:
        read_features(tmp_path / "empty.zarr", [0])
    assert "empty.zarr" in str(exc.value)


def test_feature_rows_across_samples(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    b = 100 + np.arange(9, dtype=np.float32).reshape(3, 3)
    paths = {"s1": write_features(tmp_path / "s1.zarr", a, encoder="e"),
             "s__2": write_features(tmp_path / "s2.zarr", b, encoder="e")}
    ids = ["s__2__000002", "s1__000000", "s1__000003", "s__2__000000", "s1__000000"]
    got = feature_rows(paths, ids)
    np.testing.assert_array_equal(got, np.stack([b[2], a[0], a[3], b[0], a[0]]))
    assert got.dtype == np.float32
    with pytest.raises(InputError, match="no cached features for sample 's3'"):
        feature_rows(paths, ["s1__000000", "s3__000001"])
    with pytest.raises(InputError, match=r"tile index 4 out of range \(4 rows\)") as exc:
        feature_rows(paths, ["s1__000004"])
    assert "s1.zarr" in str(exc.value)
    with pytest.raises(InputError, match="no tiles"):
        feature_rows(paths, [])
    with pytest.raises(InputError, match="unit id"):
        feature_rows(paths, ["s1_000001"])
    with pytest.raises(InputError, match="store not found"):
        feature_rows({"s1": tmp_path / "nope.zarr"}, ["s1__000000"])
    paths["s4"] = write_features(tmp_path / "s4.zarr", np.zeros((2, 5)), encoder="e")
    with pytest.raises(InputError, match="feature dim 5 differs from 3"):
        feature_rows(paths, ["s1__000000", "s4__000001"])


def test_features_writer_is_all_or_nothing(tmp_path):
    out = tmp_path / "f.zarr"
    with pytest.raises(RuntimeError, match="not finished"):
        with open_features_writer(out, 4, 2, chunk_rows=2) as w:
            w.write(0, 4, np.ones((4, 2), np.float32))
    assert not out.exists() and list(tmp_path.iterdir()) == []
    write_features(out, np.ones((4, 2)), encoder="a", tokens=np.ones((4, 3, 2)))
    assert zarr.open_group(str(out), mode="r")["tokens"].dtype == np.float16
    assert read_features(out)[1]["n_tokens"] == 3
    with pytest.raises(ValueError, match="boom"):
        with open_features_writer(out, 4, 2, chunk_rows=2) as w:
            raise ValueError("boom")
    assert read_features(out)[1]["encoder"] == "a"  # the old store is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["f.zarr"]


# what features.smk takes from common.smk, for a config of section overrides (no cohort files)
SNAKEFILE = """
import re
import sys
sys.path.insert(0, "{repo}/workflow")
from paths import WorkflowPaths
from morphomol.config import default_sections
from morphomol.config.sections import to_plain
configfile: "config.yaml"
P = WorkflowPaths()
CFG = default_sections(**config)
COHORTS = {{"demo": None}}
def cfg_of(w):
    return CFG
def samples_of(cohort):
    return ["s1", "s2"]
def section(name):
    return lambda w: to_plain(getattr(CFG, name))
def resource(name):
    return lambda w: int(getattr(CFG.resources, name))
def runtime_min(base, *args, **kwargs):
    return lambda w, input, attempt: int(base) * attempt
include: "{repo}/workflow/rules/features.smk"
""".strip()


@pytest.mark.slow
def test_features_rule_through_snakemake(store, tmp_path):
    snakemake = Path(sys.executable).with_name("snakemake")
    if not snakemake.exists():
        pytest.skip("snakemake not installed in this environment")
    path, _ = store
    for s in ("s1", "s2"):
        sdir = tmp_path / f"results/demo/samples/{s}"
        sdir.mkdir(parents=True)
        shutil.copytree(path, sdir / "images.zarr")
    enc = create_encoder("vit_s", seed=2, **TINY)
    save_weights(enc, tmp_path / "weights/vit.safetensors")
    cfg = {"features": {"batch_size": 8, "device": "cpu"}, "model": {"vit": TINY},
           "encoders": {"vit_s": {"weights": "weights/vit.safetensors"}}, "resources": {"gpu_mem_mb": 1000}}
    (tmp_path / "config.yaml").write_text(json.dumps(cfg))
    (tmp_path / "Snakefile").write_text(SNAKEFILE.format(repo=REPO))
    target = "results/demo/features/vit_s/s1.zarr"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([str(snakemake), "--cores", "1", "--resources", "gpu=1", "-d", str(tmp_path), "-s",
                        str(tmp_path / "Snakefile"), target], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    feats, attrs = read_features(tmp_path / target)
    assert feats.shape == (20, 32)
    assert attrs["weights_sha256"] == hashlib.sha256((tmp_path / "weights/vit.safetensors").read_bytes()).hexdigest()
    log = (tmp_path / "results/demo/logs/features/vit_s/group0.log").read_text()
    assert "20/20 tiles" in log
    assert read_features(tmp_path / "results/demo/features/vit_s/s2.zarr")[0].shape == (20, 32)  # one job, both
    # the weights are an input: a new weights file makes the job out of date
    save_weights(create_encoder("vit_s", seed=3, **TINY), tmp_path / "weights/vit.safetensors")
    r = subprocess.run([str(snakemake), "-n", "-d", str(tmp_path), "-s", str(tmp_path / "Snakefile"), target],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "features" in r.stdout, r.stdout[-2000:]
