"""XeniumBundle on real 10x files (tests/data, see tests/data/LICENSES.md)."""

from __future__ import annotations

import gzip
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile

from morphomol.errors import InputError
from morphomol.io.xenium import CONTROL_PREFIXES, TranscriptBatch, XeniumBundle, is_control

DATA = Path(__file__).parent / "data"
SFE = DATA / "xenium_mini_sfe"
XOA1 = DATA / "xenium_small_xoa1"
BRAIN = DATA / "xenium_mouse_brain_csv" / "sample1"
BREAST = DATA / "xenium_breast_tx_sample" / "ILC_transcripts.parquet"


def make_bundle(root: Path, transcripts: Path | None, *, name: str | None = None,
                experiment: Path = XOA1 / "experiment.xenium", extra: dict[str, Path] | None = None) -> Path:
    """A bundle directory of real files; ``name`` renames the transcript file."""
    root.mkdir(parents=True, exist_ok=True)
    if experiment is not None:
        shutil.copy(experiment, root / "experiment.xenium")
    if transcripts is not None:
        shutil.copy(transcripts, root / (name or transcripts.name))
    for dst, src in (extra or {}).items():
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / dst)
    return root


def reference_counts(df: pd.DataFrame, qv_min: float | None = 20.0, drop_controls: bool = True) -> Counter:
    names = df["feature_name"].astype(str)
    keep = np.ones(len(df), dtype=bool)
    if drop_controls:
        keep &= ~names.str.startswith(CONTROL_PREFIXES).to_numpy()
    if qv_min is not None:
        keep &= (df["qv"] >= qv_min).to_numpy()
    return Counter(names[keep].tolist())


def stream_counts(bundle: XeniumBundle, **kw) -> tuple[Counter, list[TranscriptBatch]]:
    batches = list(bundle.iter_transcripts(**kw))
    c: Counter = Counter()
    for b in batches:
        c.update(np.asarray(b.gene_names, dtype=object)[b.gene_codes].tolist())
    return c, batches


# ---------------------------------------------------------------- experiment.xenium
@pytest.mark.parametrize("experiment", [XOA1 / "experiment.xenium", XOA1 / "experiment.breast_preview.xenium",
                                        BRAIN / "experiment.xenium"])
def test_pixel_size_from_real_experiment_files(tmp_path, experiment):
    d = make_bundle(tmp_path / "b", SFE / "transcripts.parquet", experiment=experiment)
    b = XeniumBundle(d)
    assert b.pixel_size == pytest.approx(0.2125)
    assert b.transcripts_path == d / "transcripts.parquet"
    # the path of experiment.xenium itself is accepted too
    assert XeniumBundle(d / "experiment.xenium").path == d


# ---------------------------------------------------------------- parquet streaming
def test_parquet_stream_matches_pandas_reference(tmp_path):
    d = make_bundle(tmp_path / "b", SFE / "transcripts.parquet")
    b = XeniumBundle(d)
    df = pd.read_parquet(SFE / "transcripts.parquet")
    counts, batches = stream_counts(b, batch_size=1000)
    assert counts == reference_counts(df)
    assert all(b_.n_rows_read <= 1000 for b_ in batches) and len(batches) == 6
    assert sum(x.n_rows_read for x in batches) == len(df) == b.n_rows
    ctrl = df["feature_name"].str.startswith(CONTROL_PREFIXES)
    assert sum(x.n_controls_dropped for x in batches) == int(ctrl.sum()) == 3
    # bundle-wide gene index: same list object in every batch, == feature_names()
    assert all(x.gene_names is b.genes for x in batches)
    assert b.feature_names() == sorted(set(df["feature_name"][~ctrl]))
    assert not any(is_control(g) for g in b.genes)
    # coordinates: float32 µm, in file order
    x = np.concatenate([x.x for x in batches])
    y = np.concatenate([x.y for x in batches])
    assert x.dtype == np.float32 and y.dtype == np.float32
    keep = (~ctrl) & (df["qv"] >= 20)
    np.testing.assert_allclose(x, df["x_location"][keep].to_numpy(np.float32))
    np.testing.assert_allclose(y, df["y_location"][keep].to_numpy(np.float32))
    codes = np.concatenate([x.gene_codes for x in batches])
    assert codes.dtype == np.int32
    assert (np.asarray(b.genes, dtype=object)[codes] == df["feature_name"][keep].to_numpy()).all()


def test_extra_columns_and_no_control_drop(tmp_path):
    d = make_bundle(tmp_path / "b", SFE / "transcripts.parquet")
    b = XeniumBundle(d)
    df = pd.read_parquet(SFE / "transcripts.parquet")
    counts, batches = stream_counts(b, batch_size=2048, drop_controls=False, columns=("cell_id", "qv", "x_location"))
    assert counts == reference_counts(df, drop_controls=False)
    assert batches[0].gene_names is b.features and "BLANK_0070" in b.features
    cell = np.concatenate([x.columns["cell_id"] for x in batches])
    assert cell.tolist() == df["cell_id"][df["qv"] >= 20].tolist()
    assert np.concatenate([x.columns["qv"] for x in batches]).min() >= 20
    assert batches[0].feature_name[0] == df["feature_name"][0]


def test_parquet_and_csv_gz_give_identical_counts(tmp_path):
    bp = XeniumBundle(make_bundle(tmp_path / "p", SFE / "transcripts.parquet"))
    bc = XeniumBundle(make_bundle(tmp_path / "c", SFE / "transcripts.csv.gz"))
    assert bc.transcripts_path.name == "transcripts.csv.gz" and bc.n_rows is None
    cp, batches_p = stream_counts(bp, batch_size=700)
    cc, batches_c = stream_counts(bc, batch_size=700)
    assert cp == cc and sum(cp.values()) == 5257
    assert bp.genes == bc.genes
    # CSV batches are re-cut to batch_size rows
    assert [x.n_rows_read for x in batches_c] == [700] * 7 + [360]
    np.testing.assert_allclose(np.concatenate([x.x for x in batches_p]), np.concatenate([x.x for x in batches_c]), atol=1e-3)


def test_parquet_preferred_over_csv(tmp_path):
    d = make_bundle(tmp_path / "b", SFE / "transcripts.csv.gz")
    shutil.copy(SFE / "transcripts.parquet", d)
    assert XeniumBundle(d).transcripts_path.name == "transcripts.parquet"


def test_old_csv_export_mouse_brain(tmp_path):
    d = make_bundle(tmp_path / "b", BRAIN / "transcripts.csv", experiment=BRAIN / "experiment.xenium")
    b = XeniumBundle(d)
    assert b.transcripts_path.name == "transcripts.csv"
    df = pd.read_csv(BRAIN / "transcripts.csv")
    counts, batches = stream_counts(b, batch_size=300)
    assert counts == reference_counts(df)
    low = (~df["feature_name"].str.startswith(CONTROL_PREFIXES)) & (df["qv"] < 20)
    assert sum(x.n_low_qv_dropped for x in batches) == int(low.sum()) > 0
    assert sum(x.n_controls_dropped for x in batches) == int(df["feature_name"].str.startswith(CONTROL_PREFIXES).sum()) > 0


def test_real_breast_transcripts_with_control_probes(tmp_path):
    b = XeniumBundle(make_bundle(tmp_path / "b", BREAST, name="transcripts.parquet"))
    df = pd.read_parquet(BREAST)
    assert str(pq.ParquetFile(BREAST).schema_arrow.field("feature_name").type) == "large_string"
    counts, batches = stream_counts(b, batch_size=5000)
    assert counts == reference_counts(df)
    ctrl = df["feature_name"].str.startswith(CONTROL_PREFIXES)
    for prefix in ("BLANK_", "NegControlCodeword_", "NegControlProbe_"):
        assert any(f.startswith(prefix) for f in b.features)
    assert sum(x.n_controls_dropped for x in batches) == int(ctrl.sum())
    assert sum(x.n_low_qv_dropped for x in batches) == int(((~ctrl) & (df["qv"] < 20)).sum())
    assert len(b.features) == df["feature_name"].nunique() and len(b.genes) == df["feature_name"][~ctrl].nunique()


def test_qv_filter_disabled_and_missing_qv_column(tmp_path):
    df = pd.read_parquet(BREAST)
    b = XeniumBundle(make_bundle(tmp_path / "b", BREAST, name="transcripts.parquet"))
    counts, batches = stream_counts(b, batch_size=50_000, qv_min=None)
    assert counts == reference_counts(df, qv_min=None)
    assert sum(x.n_low_qv_dropped for x in batches) == 0
    noqv = tmp_path / "noqv"
    noqv.mkdir()
    pq.write_table(pq.read_table(BREAST).drop_columns(["qv"]), noqv / "transcripts.parquet")
    b2 = XeniumBundle(make_bundle(noqv, None))
    c2, _ = stream_counts(b2, qv_min=20.0)  # skipped with a warning, not an error
    assert c2 == counts


def test_xoa1_tiny_bundle_float_transcript_ids(tmp_path):
    b = XeniumBundle(make_bundle(tmp_path / "b", XOA1 / "transcripts.parquet"))
    df = pd.read_parquet(XOA1 / "transcripts.parquet")
    counts, batches = stream_counts(b)
    assert counts == reference_counts(df)
    assert sum(x.n_low_qv_dropped for x in batches) == int((df["qv"] < 20).sum()) == 2


@pytest.mark.parametrize("kind", ["binary", "large_binary", "dict_string", "dict_binary", "bytes_repr_csv"])
def test_feature_name_storage_variants(tmp_path, kind):
    """Real XOA parquet stores feature_name as binary; others as dictionary; all decode alike."""
    table = pq.read_table(SFE / "transcripts.parquet")
    i = table.schema.get_field_index("feature_name")
    col = table.column("feature_name")
    d = tmp_path / "b"
    d.mkdir()
    if kind == "bytes_repr_csv":
        df = table.to_pandas()
        df["feature_name"] = [repr(s.encode()) for s in df["feature_name"]]  # "b'CD3E'"
        with gzip.open(d / "transcripts.csv.gz", "wt") as fh:
            df.to_csv(fh, index=False)
    else:
        new = {
            "binary": lambda: col.cast(pa.binary()),
            "large_binary": lambda: col.cast(pa.large_binary()),
            "dict_string": lambda: col.dictionary_encode(),
            "dict_binary": lambda: col.cast(pa.binary()).dictionary_encode(),
        }[kind]()
        pq.write_table(table.set_column(i, "feature_name", new), d / "transcripts.parquet")
    b = XeniumBundle(make_bundle(d, None))
    ref = XeniumBundle(make_bundle(tmp_path / "ref", SFE / "transcripts.parquet"))
    assert b.feature_names() == ref.feature_names()
    assert stream_counts(b, batch_size=999)[0] == stream_counts(ref)[0]


# ---------------------------------------------------------------- morphology + cells
def test_real_morphology_focus_and_cells(tmp_path):
    d = make_bundle(tmp_path / "b", SFE / "transcripts.parquet",
                    extra={"morphology_focus.ome.tif": SFE / "morphology_focus.ome.tif", "cells.parquet": SFE / "cells.parquet"})
    b = XeniumBundle(d)
    assert b.morphology_path == d / "morphology_focus.ome.tif"
    assert b.morphology_levels() == [(237, 237)]
    img = b.read_morphology()
    assert img.dtype == np.uint16 and img.shape == (237, 237)
    np.testing.assert_array_equal(img, tifffile.imread(SFE / "morphology_focus.ome.tif"))
    cells = b.read_cells()
    assert len(cells) == 526 and {"cell_id", "x_centroid", "y_centroid"} <= set(cells.columns)


@pytest.mark.parametrize("name", ["morphology_mip.ome.tif", "morphology_focus/ch0000_dapi.ome.tif"])
def test_morphology_fallback_names(tmp_path, name):
    d = make_bundle(tmp_path / "b", SFE / "transcripts.parquet", extra={name: SFE / "morphology_focus.ome.tif"})
    b = XeniumBundle(d)
    assert b.morphology_path == d / name
    assert b.read_morphology().shape == (237, 237)


def test_morphology_subifd_pyramid_multichannel(tmp_path):
    """OME-TIFF pyramid in SubIFDs (as XOA writes): levels via tifffile, channel 0 = DAPI."""
    rng = np.random.default_rng(0)
    dapi = rng.integers(0, 4000, (256, 192), dtype=np.uint16)
    other = np.full_like(dapi, 7)
    data = np.stack([dapi, other])
    d = make_bundle(tmp_path / "b", SFE / "transcripts.parquet")
    with tifffile.TiffWriter(d / "morphology_focus.ome.tif", ome=True) as tw:
        tw.write(data, subifds=2, tile=(64, 64), compression="zlib", metadata={"axes": "CYX", "PhysicalSizeX": 0.2125})
        for f in (2, 4):
            tw.write(data[:, ::f, ::f], subfiletype=1, tile=(64, 64), compression="zlib")
    b = XeniumBundle(d)
    assert b.morphology_levels() == [(256, 192), (128, 96), (64, 48)]
    np.testing.assert_array_equal(b.read_morphology(0), dapi)
    np.testing.assert_array_equal(b.read_morphology(2), dapi[::4, ::4])
    assert b.read_morphology(1).dtype == np.uint16
    with pytest.raises(InputError, match="level 3"):
        b.read_morphology(3)


def test_gene_panel_json(tmp_path):
    d = make_bundle(tmp_path / "b", SFE / "transcripts.parquet")
    assert XeniumBundle(d).gene_panel() is None
    panel = {"metadata": {"format_version": 1}, "payload": {"targets": [
        {"type": {"data": {"id": "ENSG00000142208", "name": "AKT1"}, "descriptor": "gene"}},
        {"type": {"data": {"id": "ENSG00000167286", "name": "CD3D"}, "descriptor": "gene"}},
        {"type": {"data": {"id": "NegControlProbe_00003", "name": "NegControlProbe_00003"}, "descriptor": "negative_control_probe"}},
        {"type": {"data": {"name": "BLANK_0070"}, "descriptor": "gene"}},
    ]}}
    (d / "gene_panel.json").write_text(json.dumps(panel))
    assert XeniumBundle(d).gene_panel() == ["AKT1", "CD3D"]


# ---------------------------------------------------------------- bad input
def _raises(match: str, path: Path, fn, *args, **kw) -> InputError:
    with pytest.raises(InputError, match=match) as info:
        fn(*args, **kw)
    assert str(path) in str(info.value), str(info.value)
    return info.value


def _drain(bundle: XeniumBundle, **kw) -> None:
    for _ in bundle.iter_transcripts(**kw):
        pass


def test_missing_directory_and_experiment(tmp_path):
    _raises("not found", tmp_path / "nope", XeniumBundle, tmp_path / "nope")
    d = make_bundle(tmp_path / "b", SFE / "transcripts.parquet", experiment=None)
    _raises("experiment.xenium not found", d / "experiment.xenium", XeniumBundle, d)


@pytest.mark.parametrize("content, match", [
    ({"run_name": "x"}, "field 'pixel_size': missing"),
    ({"pixel_size": "abc"}, "field 'pixel_size': invalid"),
    ({"pixel_size": -1}, "field 'pixel_size': invalid"),
    ("{not json", "not valid JSON"),
])
def test_bad_experiment_xenium(tmp_path, content, match):
    d = make_bundle(tmp_path / "b", SFE / "transcripts.parquet")
    (d / "experiment.xenium").write_text(content if isinstance(content, str) else json.dumps(content))
    _raises(match, d / "experiment.xenium", XeniumBundle, d)


def test_no_transcripts_file(tmp_path):
    d = make_bundle(tmp_path / "b", None)
    err = _raises("no transcripts file", d, XeniumBundle, d)
    assert "transcripts.parquet" in str(err) and "transcripts.csv.gz" in str(err)


@pytest.mark.parametrize("fmt", ["parquet", "csv.gz"])
def test_missing_required_columns_listed(tmp_path, fmt):
    df = pd.read_parquet(SFE / "transcripts.parquet").drop(columns=["x_location", "feature_name"])
    d = tmp_path / "b"
    d.mkdir()
    f = d / f"transcripts.{fmt}"
    df.to_parquet(f) if fmt == "parquet" else df.to_csv(f, index=False)
    err = _raises("missing required column", f, XeniumBundle, make_bundle(d, None))
    assert "feature_name" in str(err) and "x_location" in str(err) and "y_location" not in str(err).split("found")[0]


def test_requested_extra_column_missing(tmp_path):
    b = XeniumBundle(make_bundle(tmp_path / "b", XOA1 / "transcripts.parquet"))
    _raises("fov_name", b.transcripts_path, _drain, b, columns=("fov_name",))


def test_nan_and_inf_coordinates_parquet(tmp_path):
    table = pq.read_table(SFE / "transcripts.parquet")
    x = table.column("x_location").to_numpy().copy()
    y = table.column("y_location").to_numpy().copy()
    x[1500] = np.nan
    y[4000] = np.inf
    x[4001] = -np.inf
    table = table.set_column(table.schema.get_field_index("x_location"), "x_location", pa.array(x))
    table = table.set_column(table.schema.get_field_index("y_location"), "y_location", pa.array(y))
    d = tmp_path / "b"
    d.mkdir()
    pq.write_table(table, d / "transcripts.parquet")
    b = XeniumBundle(make_bundle(d, None))
    err = _raises(r"3 row\(s\) with missing, NaN or infinite coordinates; first bad row index 1500", b.transcripts_path,
                  _drain, b, batch_size=1000)
    assert err.field == "x_location/y_location"


def test_missing_coordinates_csv(tmp_path):
    lines = gzip.open(SFE / "transcripts.csv.gz", "rt").read().splitlines()
    parts = lines[11].split(",")
    parts[4] = ""  # x_location of data row 10 empty
    lines[11] = ",".join(parts)
    parts = lines[21].split(",")
    parts[5] = "NaN"
    lines[21] = ",".join(parts)
    d = tmp_path / "b"
    d.mkdir()
    with gzip.open(d / "transcripts.csv.gz", "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    b = XeniumBundle(make_bundle(d, None))
    _raises(r"2 row\(s\).*first bad row index 10", b.transcripts_path, _drain, b)


def test_null_feature_name(tmp_path):
    table = pq.read_table(XOA1 / "transcripts.parquet")
    i = table.schema.get_field_index("feature_name")
    table = table.set_column(i, "feature_name", pa.array([None, "A", "B"], pa.string()))
    d = tmp_path / "b"
    d.mkdir()
    pq.write_table(table, d / "transcripts.parquet")
    b = XeniumBundle(make_bundle(d, None))
    _raises("without a feature name", b.transcripts_path, b.feature_names)


def test_empty_and_fully_filtered_files(tmp_path):
    table = pq.read_table(SFE / "transcripts.parquet")
    d = tmp_path / "empty"
    d.mkdir()
    pq.write_table(table.slice(0, 0), d / "transcripts.parquet")
    b = XeniumBundle(make_bundle(d, None))
    _raises("no transcript rows", b.transcripts_path, _drain, b)
    # a header-only CSV
    d2 = tmp_path / "emptycsv"
    d2.mkdir()
    (d2 / "transcripts.csv").write_text(",".join(table.column_names) + "\n")
    b2 = XeniumBundle(make_bundle(d2, None))
    _raises("no transcript rows", b2.transcripts_path, _drain, b2)
    # rows exist but none survives the filters
    b3 = XeniumBundle(make_bundle(tmp_path / "b3", SFE / "transcripts.parquet"))
    _raises(r"no transcripts left after filtering: 5260 rows read, 3 control rows dropped, 5257 rows with qv < 100",
            b3.transcripts_path, _drain, b3, qv_min=100.0)
    d4 = tmp_path / "controls"
    d4.mkdir()
    names = pq.read_table(BREAST).column("feature_name").to_pylist()
    keep = [i for i, n in enumerate(names) if is_control(n)]
    pq.write_table(pq.read_table(BREAST).take(keep), d4 / "transcripts.parquet")
    b4 = XeniumBundle(make_bundle(d4, None))
    assert b4.feature_names() == []
    _raises("no transcripts left", b4.transcripts_path, _drain, b4)


def test_corrupt_parquet(tmp_path):
    d = tmp_path / "garbage"
    d.mkdir()
    (d / "transcripts.parquet").write_bytes(b"this is not parquet" * 20)
    make_bundle(d, None)
    _raises("corrupt or unreadable Parquet", d / "transcripts.parquet", XeniumBundle, d)
    # valid footer, damaged data pages
    d2 = tmp_path / "damaged"
    d2.mkdir()
    raw = bytearray((SFE / "transcripts.parquet").read_bytes())
    raw[4:60000] = b"\x00" * (60000 - 4)
    (d2 / "transcripts.parquet").write_bytes(bytes(raw))
    b = XeniumBundle(make_bundle(d2, None))
    _raises("corrupt or unreadable Parquet", b.transcripts_path, _drain, b)


def test_corrupt_csv_gz(tmp_path):
    raw = (SFE / "transcripts.csv.gz").read_bytes()
    d = tmp_path / "trunc"
    d.mkdir()
    (d / "transcripts.csv.gz").write_bytes(raw[: len(raw) // 2])
    b = XeniumBundle(make_bundle(d, None))
    _raises("corrupt or unreadable CSV", b.transcripts_path, _drain, b)
    d2 = tmp_path / "notgz"
    d2.mkdir()
    (d2 / "transcripts.csv.gz").write_bytes(b"\x1f\x8bnot really gzip" * 10)
    _raises("corrupt or unreadable CSV", d2 / "transcripts.csv.gz", XeniumBundle, make_bundle(d2, None))
    d3 = tmp_path / "text"
    d3.mkdir()
    (d3 / "transcripts.csv").write_text("feature_name,x_location,y_location,qv\nCD3E,abc,1.0,40\n")
    b3 = XeniumBundle(make_bundle(d3, None))
    _raises("x_location", b3.transcripts_path, _drain, b3)


def test_missing_and_corrupt_morphology(tmp_path):
    d = make_bundle(tmp_path / "b", SFE / "transcripts.parquet")
    b = XeniumBundle(d)
    assert b.morphology_path is None
    _raises("no morphology image", d, b.read_morphology)
    raw = (SFE / "morphology_focus.ome.tif").read_bytes()
    (d / "morphology_focus.ome.tif").write_bytes(b"II*\x00" + b"\xff" * 100)
    _raises("corrupt or unreadable TIFF", d / "morphology_focus.ome.tif", b.read_morphology)
    (d / "morphology_focus.ome.tif").write_bytes(raw[:2000])  # truncated: header fine, pixels gone
    _raises("corrupt or unreadable TIFF", d / "morphology_focus.ome.tif", b.read_morphology)
