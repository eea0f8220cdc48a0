"""open_slide on a real Aperio SVS and on pyramids written with tifffile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from morphomol.errors import InputError
from morphomol.io.he import open_slide

DATA = Path(__file__).parent / "data"
SVS = DATA / "he_images" / "cmu_small_region.svs"


@pytest.fixture(scope="module")
def he_rgb() -> np.ndarray:
    """A 1024×768 crop of the real CMU H&E (realistic, JPEG-friendly content)."""
    with openslide.OpenSlide(str(SVS)) as s:
        return np.asarray(s.read_region((600, 900), 0, (768, 1024)).convert("RGB"))


def _write_generic_pyramid(path: Path, img: np.ndarray, *, mpp: float | None, unit: str = "CENTIMETER",
                           compression: str = "jpeg") -> None:
    """Tiled pyramid as separate IFDs: level 0 subfiletype 0, reduced levels subfiletype 1."""
    per_unit = 1e4 if unit == "CENTIMETER" else 25400.0
    with tifffile.TiffWriter(path) as tw:
        for k, f in enumerate((1, 2, 4)):
            lvl = np.ascontiguousarray(img[::f, ::f])
            kw = {}
            if mpp is not None:
                kw = {"resolution": (per_unit / (mpp * f), per_unit / (mpp * f)), "resolutionunit": unit}
            tw.write(lvl, tile=(256, 256), compression=compression, photometric="rgb",
                     subfiletype=0 if k == 0 else 1, **kw)


def _write_ome_subifd_pyramid(path: Path, img: np.ndarray, *, mpp: float | None) -> None:
    meta = {"axes": "YXS"}
    if mpp is not None:
        meta.update(PhysicalSizeX=mpp, PhysicalSizeY=mpp, PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(img, subifds=2, tile=(256, 256), compression="zlib", photometric="rgb", metadata=meta)
        for f in (2, 4):
            tw.write(np.ascontiguousarray(img[::f, ::f]), subfiletype=1, tile=(256, 256), compression="zlib",
                     photometric="rgb")


def _record_levels(slide) -> list[int]:
    calls: list[int] = []
    orig = slide.read_region

    def spy(location, level, size):
        calls.append(level)
        return orig(location, level, size)

    slide.read_region = spy
    return calls


# ---------------------------------------------------------------- real SVS through OpenSlide
def test_real_svs_via_openslide():
    with open_slide(SVS) as s:
        assert s.backend == "openslide"
        assert s.dimensions == (2220, 2967) and s.level_count == 1
        assert s.mpp == pytest.approx(0.499) and s.mpp_source == "openslide.mpp-x"
        region = s.read_region((1000, 1200), 0, (300, 200))
        assert region.shape == (200, 300, 3) and region.dtype == np.uint8
        # same pixels as tifffile's own JPEG decode of the SVS (decoders may differ by a few levels)
        ref = tifffile.imread(SVS, series=0)[1200:1400, 1000:1300]
        assert np.abs(region.astype(int) - ref.astype(int)).mean() < 2.0
        assert region.std() > 5  # real tissue, not a blank fill
        # partly outside the slide: the outside is white, the inside is the image
        edge = s.read_region((2200, -10), 0, (40, 30))
        assert (edge[:10] == 255).all() and (edge[:, 20:] == 255).all()
        np.testing.assert_array_equal(edge[10:, :20], s.read_region((2200, 0), 0, (20, 20)))
        thumb, ds = s.thumbnail(512)
        assert max(thumb.shape[:2]) == 512 and thumb.shape[2] == 3 and thumb.dtype == np.uint8
        assert ds == pytest.approx(2967 / 512, rel=0.01)


def test_mpp_argument_overrides_and_sheet_blanks():
    assert open_slide(SVS, mpp=0.25).mpp == 0.25
    assert open_slide(SVS, mpp=float("nan")).mpp == pytest.approx(0.499)  # empty he_mpp cell
    assert open_slide(SVS, mpp="").mpp == pytest.approx(0.499)
    assert open_slide(SVS, mpp="0.5").mpp == 0.5
    for bad in ("abc", -1.0, 0):
        with pytest.raises(InputError, match="he_mpp") as info:
            open_slide(SVS, mpp=bad)
        assert str(SVS) in str(info.value)


# ---------------------------------------------------------------- tifffile-written pyramids
def test_generic_tiff_pyramid_opens_with_all_levels_and_mpp(tmp_path, he_rgb):
    f = tmp_path / "pyramid.tif"
    _write_generic_pyramid(f, he_rgb, mpp=0.25)
    with open_slide(f) as s:
        assert s.backend == "openslide"
        assert s.level_count == 3
        assert s.level_dimensions == [(768, 1024), (384, 512), (192, 256)]
        assert s.level_downsamples == pytest.approx([1.0, 2.0, 4.0])
        assert s.mpp == pytest.approx(0.25)
        assert s.get_best_level_for_downsample(3.0) == 1 and s.get_best_level_for_downsample(100) == 2
        r = s.read_region((200, 400), 1, (64, 48))  # level-0 origin, level-1 size
        ref = he_rgb[::2, ::2][200:248, 100:164]
        assert r.shape == (48, 64, 3)
        assert np.abs(r.astype(int) - ref.astype(int)).mean() < 6  # JPEG
        calls = _record_levels(s)
        thumb, ds = s.thumbnail(200)
        assert calls == [2]  # the smallest level that is still large enough, never level 0
        assert max(thumb.shape[:2]) == 200 and ds == pytest.approx(1024 / 200, rel=0.01)


def test_generic_tiff_resolution_in_inches(tmp_path, he_rgb):
    f = tmp_path / "inch.tif"
    _write_generic_pyramid(f, he_rgb[:512, :512], mpp=0.5, unit="INCH")
    with open_slide(f) as s:
        assert s.mpp == pytest.approx(0.5, rel=1e-3)


def test_ome_tiff_subifd_pyramid_goes_through_tifffile(tmp_path, he_rgb):
    f = tmp_path / "he.ome.tif"
    _write_ome_subifd_pyramid(f, he_rgb, mpp=0.2738)
    assert openslide.OpenSlide(str(f)).level_count == 1  # why the fallback exists
    with open_slide(f) as s:
        assert s.backend == "tifffile"
        assert s.level_count == 3 and s.dimensions == (768, 1024)
        assert s.level_dimensions[2] == (192, 256)
        assert s.mpp == pytest.approx(0.2738) and s.mpp_source == "OME PhysicalSizeX"
        np.testing.assert_array_equal(s.read_region((100, 300), 0, (50, 40)), he_rgb[300:340, 100:150])
        np.testing.assert_array_equal(s.read_region((400, 200), 2, (20, 10)), he_rgb[::4, ::4][50:60, 100:120])
        # out of bounds: white fill around the image
        r = s.read_region((-20, 1000), 0, (40, 40))
        assert (r[:, :20] == 255).all() and (r[24:] == 255).all()
        np.testing.assert_array_equal(r[:24, 20:], he_rgb[1000:1024, 0:20])
        calls = _record_levels(s)
        thumb, ds = s.thumbnail(300)
        assert calls == [1] and max(thumb.shape[:2]) == 300


def test_tifffile_fallback_when_openslide_cannot_open(tmp_path, he_rgb):
    """A strip (untiled) TIFF is rejected by OpenSlide's generic-tiff driver."""
    f = tmp_path / "strips.tif"
    tifffile.imwrite(f, he_rgb[:300, :200], photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5),
                     resolutionunit="CENTIMETER")
    with pytest.raises(openslide.OpenSlideError):
        openslide.OpenSlide(str(f))
    with open_slide(f) as s:
        assert s.backend == "tifffile" and s.dimensions == (200, 300)
        assert s.mpp == pytest.approx(0.5) and s.mpp_source.startswith("TIFF resolution")
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (200, 300)), he_rgb[:300, :200])


def test_png_needs_mpp_then_opens_with_pillow(tmp_path, he_rgb):
    f = tmp_path / "tile.png"
    Image.fromarray(he_rgb[:256, :256]).save(f)
    with pytest.raises(InputError, match="set he_mpp") as info:
        open_slide(f)
    assert str(f) in str(info.value)
    with open_slide(f, mpp=0.5) as s:
        assert s.backend == "pillow" and s.dimensions == (256, 256)
        np.testing.assert_array_equal(s.read_region((10, 20), 0, (30, 40)), he_rgb[20:60, 10:40])


# ---------------------------------------------------------------- no MPP / bad files
@pytest.mark.parametrize("kind", ["generic_no_resolution", "ome_no_physical_size", "dpi72"])
def test_he_without_mpp_errors(tmp_path, he_rgb, kind):
    f = tmp_path / f"{kind}.tif"
    if kind == "generic_no_resolution":
        _write_generic_pyramid(f, he_rgb[:512, :512], mpp=None)
    elif kind == "ome_no_physical_size":
        _write_ome_subifd_pyramid(f, he_rgb[:512, :512], mpp=None)
    else:  # 72 dpi, the default of many writers: 352.8 µm/px is not an H&E resolution
        _write_generic_pyramid(f, he_rgb[:512, :512], mpp=25400 / 72, unit="INCH")
    with pytest.raises(InputError, match="set he_mpp for this sample in the sample sheet") as info:
        open_slide(f)
    assert info.value.file == str(f) and info.value.field == "mpp"
    with open_slide(f, mpp=0.5) as s:  # the sheet value rescues it
        assert s.mpp == 0.5 and s.level_count == 3


def test_missing_and_corrupt_he(tmp_path):
    with pytest.raises(InputError, match="not found") as info:
        open_slide(tmp_path / "nope.svs")
    assert str(tmp_path / "nope.svs") in str(info.value)
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"definitely not a slide" * 100)
    with pytest.raises(InputError, match="cannot read the image") as info:
        open_slide(bad, mpp=0.5)
    assert str(bad) in str(info.value)
    trunc = tmp_path / "trunc.svs"
    trunc.write_bytes(SVS.read_bytes()[:5000])
    with pytest.raises(InputError) as info:
        open_slide(trunc, mpp=0.5).read_region((0, 0), 0, (10, 10))
    assert str(trunc) in str(info.value)


@pytest.mark.parametrize("fmt", ["generic", "ome"])
def test_damaged_tile_is_an_input_error_naming_the_file(tmp_path, he_rgb, fmt):
    f = tmp_path / ("g.tif" if fmt == "generic" else "o.ome.tif")
    if fmt == "generic":
        _write_generic_pyramid(f, he_rgb, mpp=0.25)
    else:
        _write_ome_subifd_pyramid(f, he_rgb, mpp=0.25)
    with tifffile.TiffFile(f) as t:
        off = t.pages[0].dataoffsets[0]
    raw = bytearray(f.read_bytes())
    raw[off : off + 64] = b"\x00" * 64  # first tile of level 0: JPEG SOI / zlib header destroyed
    f.write_bytes(bytes(raw))
    with open_slide(f) as s:
        assert s.backend == ("openslide" if fmt == "generic" else "tifffile")
        s.read_region((600, 800), 0, (10, 10))  # other tiles still read
        with pytest.raises(InputError, match="cannot read region") as info:
            s.read_region((0, 0), 0, (100, 100))
        assert str(f) in str(info.value)
