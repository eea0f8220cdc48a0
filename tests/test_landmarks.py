"""Readers of registration inputs: keypoints CSV, 10x alignment matrix, region GeoJSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from morphomol.errors import InputError
from morphomol.io.landmarks import (
    Keypoints,
    detect_alignment_format,
    read_alignment,
    read_alignment_matrix,
    read_keypoints,
    read_regions_geojson,
    sha256_file,
    write_keypoints,
)


def test_keypoints_xenium_explorer_layout(tmp_path):
    p = tmp_path / "keypoints.csv"
    p.write_text("\ufefffixedX,fixedY,alignmentX,alignmentY\n10.5,20,100,200\n30,40,300,400\n\n50,60,500,600\n")
    kp = read_keypoints(p)
    assert len(kp) == 3 and kp.regions is None
    np.testing.assert_allclose(kp.fixed_px, [[10.5, 20], [30, 40], [50, 60]])
    np.testing.assert_allclose(kp.moving_px, [[100, 200], [300, 400], [500, 600]])
    assert kp.rows.tolist() == [2, 3, 5]  # CSV line numbers (blank line skipped)
    assert detect_alignment_format(p) == "keypoints" and isinstance(read_alignment(p), Keypoints)


def test_keypoints_with_region_and_extra_columns(tmp_path):
    p = tmp_path / "kp.csv"
    p.write_text("id,alignmentX,alignmentY,fixedX,fixedY,Region\n1,1,2,3,4,left\n2,5,6,7,8,right\n")
    kp = read_keypoints(p)
    assert kp.regions == ["left", "right"]
    np.testing.assert_allclose(kp.fixed_px, [[3, 4], [7, 8]])
    np.testing.assert_allclose(kp.moving_px, [[1, 2], [5, 6]])


def test_write_keypoints_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    f, m = rng.uniform(0, 1000, (5, 2)), rng.uniform(0, 1000, (5, 2))
    write_keypoints(tmp_path / "k.csv", f, m, ["a", "a", "b", "b", "b"])
    kp = read_keypoints(tmp_path / "k.csv")
    np.testing.assert_allclose(kp.fixed_px, f, atol=1e-4)
    np.testing.assert_allclose(kp.moving_px, m, atol=1e-4)
    assert kp.regions == ["a", "a", "b", "b", "b"]


@pytest.mark.parametrize(
    "text, match",
    [
        ("x,y,u,v\n1,2,3,4\n", "missing \\['fixedX', 'fixedY', 'alignmentX', 'alignmentY'\\]"),
        ("fixedX,fixedY,alignmentX\n1,2,3\n", "missing \\['alignmentY'\\]"),
        ("fixedX,fixedY,alignmentX,alignmentY\n1,2,3,abc\n", "line 2"),
        ("fixedX,fixedY,alignmentX,alignmentY\n1,2,3,4\n1,2,3\n", "line 3"),
        ("fixedX,fixedY,alignmentX,alignmentY\n1,2,3,inf\n", "non-finite"),
        ("fixedX,fixedY,alignmentX,alignmentY\n", "no landmark rows"),
        ("fixedX,fixedY,alignmentX,alignmentY,region\n1,2,3,4,\n", "empty region label"),
        ("", "empty"),
    ],
)
def test_keypoints_bad_input_names_file_and_field(tmp_path, text, match):
    p = tmp_path / "bad_keypoints.csv"
    p.write_text(text)
    with pytest.raises(InputError, match=match) as ei:
        read_alignment(p)
    assert "bad_keypoints.csv" in ei.value.message


def test_alignment_matrix_detected_by_content(tmp_path):
    m = np.array([[2.35, -0.15, -333.4], [0.156, 2.35, -681.7], [0, 0, 1]])
    p = tmp_path / "S1_he_imagealignment.csv"
    np.savetxt(p, m, delimiter=",")
    assert detect_alignment_format(p) == "matrix"
    np.testing.assert_allclose(read_alignment(p), m)
    q = tmp_path / "keypoints.csv"  # a matrix with a misleading name is still a matrix
    q.write_text("2.35 -0.15 -333.4\n0.156 2.35 -681.7\n0 0 1\n")
    np.testing.assert_allclose(read_alignment(q), m)
    r = tmp_path / "scaled.csv"  # homogeneous scale is normalised
    np.savetxt(r, m * 2, delimiter=",")
    np.testing.assert_allclose(read_alignment_matrix(r), m)


@pytest.mark.parametrize(
    "text, match",
    [
        ("1,0,0\n0,1,0\n", "2 rows"),
        ("1,0,0,0\n0,1,0,0\n0,0,1,0\n", "columns"),
        ("1,2,0\n2,4,0\n0,0,1\n", "singular"),
        ("1,0,0\n0,1,0\n0.1,0,1\n", "not an affine"),
        ("1,0,0\n0,1,0\n0,0,nan\n", "non-finite"),
        ("1,0,0\n0,x,0\n0,0,1\n", "line 2"),
    ],
)
def test_alignment_matrix_bad_input(tmp_path, text, match):
    p = tmp_path / "m.csv"
    p.write_text(text)
    with pytest.raises(InputError, match=match) as ei:
        read_alignment_matrix(p)
    assert "m.csv" in ei.value.message and "matrix" in ei.value.message


def _feature(name, geom):
    return {"type": "Feature", "properties": {"name": name} if name else {}, "geometry": geom}


def test_regions_geojson_variants(tmp_path):
    sq = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
    big = [[200, 0], [500, 0], [500, 300], [200, 300], [200, 0]]
    small = [[600, 0], [610, 0], [610, 10], [600, 0]]
    doc = {"type": "FeatureCollection", "features": [
        _feature("left", {"type": "Polygon", "coordinates": [sq]}),
        _feature(None, {"type": "MultiPolygon", "coordinates": [[small], [big]]}),
        {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
         "geometry": {"type": "Polygon", "coordinates": [[[0, 200], [50, 200], [50, 250], [0, 200]]]}},
    ]}
    p = tmp_path / "regions.geojson"
    p.write_text(json.dumps(doc))
    regs = read_regions_geojson(p)
    assert [r.name for r in regs] == ["left", "r1", "Tumor"]
    assert regs[0].polygon_um.shape == (4, 2)  # closing vertex dropped
    np.testing.assert_allclose(regs[1].polygon_um.max(axis=0), [500, 300])  # largest part kept
    # a bare Polygon geometry is one region
    p.write_text(json.dumps({"type": "Polygon", "coordinates": [sq]}))
    assert [r.name for r in read_regions_geojson(p)] == ["r0"]


@pytest.mark.parametrize(
    "doc, match",
    [
        ("{not json", "not valid JSON"),
        ({"type": "Point", "coordinates": [1, 2]}, "unrecognised"),
        ({"type": "FeatureCollection", "features": []}, "no region polygons"),
        ({"type": "FeatureCollection", "features": [_feature("a", {"type": "LineString", "coordinates": [[0, 0], [1, 1]]})]},
         "LineString"),
        ({"type": "FeatureCollection", "features": [_feature("a", {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 0]]]})]},
         "at least 3"),
        ({"type": "FeatureCollection", "features": [_feature("a", {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [2, 2], [0, 0]]]})]},
         "zero area"),
        ({"type": "FeatureCollection", "features": [
            _feature("a", {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1]]]}),
            _feature("a", {"type": "Polygon", "coordinates": [[[5, 0], [6, 0], [6, 1]]]})]}, "duplicate"),
    ],
)
def test_regions_geojson_bad_input(tmp_path, doc, match):
    p = tmp_path / "regions.geojson"
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(InputError, match=match) as ei:
        read_regions_geojson(p)
    assert "regions.geojson" in ei.value.message


def test_missing_file_and_checksum(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_alignment(tmp_path / "nope.csv")
    p = tmp_path / "a.csv"
    p.write_bytes(b"abc")
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
