"""H&E whole-slide image reader: OpenSlide first, tifffile fallback, Pillow for plain images.

``open_slide(path, mpp=None)`` returns a :class:`Slide` with the OpenSlide-like API of
docs/ARCHITECTURE.md. Backend choice:

* OpenSlide opens the file and sees its pyramid -> OpenSlide (SVS, NDPI, MRXS, generic
  tiled TIFF pyramids written as separate IFDs, ...).
* OpenSlide cannot open it, or sees a single level while tifffile finds a pyramid (OME-TIFF
  pyramids stored in SubIFDs) -> tifffile (regions are read tile-wise through zarr).
* neither can open it -> Pillow (PNG/JPEG tiles; single level, read into memory).

Microns per pixel at level 0, first found wins: the ``mpp`` argument (the sample sheet's
``he_mpp``), ``openslide.mpp-x``, TIFF resolution tags (unit centimetre or inch), Aperio
``MPP``, OME ``PhysicalSizeX``, PNG/JPEG dpi. Metadata values outside
:data:`PLAUSIBLE_MPP` (e.g. a 72 dpi default) are ignored. No MPP -> InputError.

Bounded reads: a file is only a header plus tiles, so a few MB can declare 200,000 x 200,000 px.
:func:`open_slide` refuses a level-0 side over :data:`MAX_SIDE_PX`, and every downsampled read
(:meth:`Slide.thumbnail`, ``tiling.read_downsampled``, the registration rasters) first asks
:meth:`Slide.check_decode`: a read that would decode more than :data:`MAX_DECODE_PX` pixels of a
pyramid level (no level close to the resolution needed) is refused with one InputError naming the
file, instead of decoding tens of gigapixels. Thumbnails are read in strips of at most
:data:`STRIP_PX` level pixels.
"""

from __future__ import annotations

import math
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from morphomol.errors import InputError
from morphomol.util.logs import get_logger

__all__ = ["Slide", "open_slide", "PLAUSIBLE_MPP", "MAX_SIDE_PX", "MAX_DECODE_PX"]

log = get_logger("io.he")

#: µm/px range accepted from file metadata (an explicit ``mpp`` argument is always used)
PLAUSIBLE_MPP: tuple[float, float] = (0.02, 50.0)
#: largest level-0 side accepted (a whole 75 mm slide at 0.1 µm/px is 750,000 px)
MAX_SIDE_PX = 1_000_000
#: most pixels of one pyramid level a downsampled read (thumbnail, tissue mask, raster) may decode:
#: 2^32 px (12.9 GB of RGB). A slide needing more has no pyramid level near the resolution asked for.
MAX_DECODE_PX = 1 << 32
#: level pixels per strip of a streamed thumbnail (192 MB of RGB)
STRIP_PX = 1 << 26
_OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}


def _plausible(value: float | None) -> float | None:
    if value is None or not math.isfinite(value) or not (PLAUSIBLE_MPP[0] <= value <= PLAUSIBLE_MPP[1]):
        return None
    return float(value)


def _mpp_argument(mpp: Any, path: Path) -> float | None:
    """The sheet's he_mpp: None, NaN or '' mean 'not given'."""
    if mpp is None:
        return None
    if isinstance(mpp, str):
        if not mpp.strip():
            return None
        try:
            mpp = float(mpp)
        except ValueError:
            raise InputError(f"not a number: {mpp!r}", file=path, field="he_mpp", expected="µm per pixel > 0") from None
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        raise InputError(f"not a number: {mpp!r}", file=path, field="he_mpp", expected="µm per pixel > 0") from None
    if math.isnan(value):
        return None
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"invalid value {mpp!r}", file=path, field="he_mpp", expected="µm per pixel > 0")
    return value


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """(h, w[, c]) array of any dtype -> (h, w, 3) uint8."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.dtype != np.uint8:
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8) * 255
        elif np.issubdtype(arr.dtype, np.integer):
            shift = max(0, 8 * arr.dtype.itemsize - 8)
            arr = (arr.astype(np.uint64) >> shift).astype(np.uint8)
        else:
            a = np.nan_to_num(arr.astype(np.float32))
            scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
            arr = np.clip(a * scale, 0, 255).astype(np.uint8)
    c = arr.shape[2]
    if c == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif c == 2:  # grey + alpha
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
    elif c > 3:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr)


def _rgba_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's RGBA (openslide-python un-premultiplies it) onto white;
    transparent pixels are outside the slide."""
    a = rgba[:, :, 3:4].astype(np.uint32)
    if bool((a == 255).all()):
        return np.ascontiguousarray(rgba[:, :, :3])
    rgb = rgba[:, :, :3].astype(np.uint32)
    out = (rgb * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


class _Backend:
    name = "?"
    level_dimensions: list[tuple[int, int]]

    def read(self, level: int, x: int, y: int, w: int, h: int, x0: int, y0: int) -> np.ndarray:
        """Region at ``level``; (x, y) level px, (x0, y0) the same point in level-0 px."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class _OpenSlideBackend(_Backend):
    name = "openslide"

    def __init__(self, osr: Any) -> None:
        self.osr = osr
        self.level_dimensions = [tuple(map(int, d)) for d in osr.level_dimensions]

    def read(self, level, x, y, w, h, x0, y0):
        rgba = np.asarray(self.osr.read_region((int(x0), int(y0)), int(level), (int(w), int(h))))
        return _rgba_on_white(rgba)

    def close(self) -> None:
        self.osr.close()


class _TiffBackend(_Backend):
    name = "tifffile"

    def __init__(self, tif: Any) -> None:
        self.tif = tif
        self.series = tif.series[0]
        self.levels = list(self.series.levels)
        self.level_dimensions = []
        for lv in self.levels:
            self.level_dimensions.append((int(lv.shape[lv.axes.index("X")]), int(lv.shape[lv.axes.index("Y")])))
        self._arrays: dict[int, Any] = {}

    def _array(self, level: int):
        if level not in self._arrays:
            import zarr

            store = self.tif.aszarr(series=0, level=level)
            self._arrays[level] = zarr.open(store, mode="r")
        return self._arrays[level]

    def read(self, level, x, y, w, h, x0, y0):
        axes = self.levels[level].axes
        arr = self._array(level)
        index = []
        for a in axes:
            if a == "Y":
                index.append(slice(y, y + h))
            elif a == "X":
                index.append(slice(x, x + w))
            elif a in "SC":
                index.append(slice(None))
            else:
                index.append(0)
        data = np.asarray(arr[tuple(index)])
        kept = [a for a in axes if a in "YXSC"]
        order = [kept.index("Y"), kept.index("X")] + [i for i, a in enumerate(kept) if a in "SC"]
        data = np.transpose(data, order)
        if data.ndim == 4:  # both S and C: flatten to channels
            data = data.reshape(data.shape[0], data.shape[1], -1)
        return _to_rgb(data)

    def close(self) -> None:
        self._arrays.clear()
        self.tif.close()


class _PILBackend(_Backend):
    name = "pillow"

    def __init__(self, img: Any) -> None:
        self.data = _to_rgb(np.asarray(img.convert("RGB")))
        self.level_dimensions = [(int(self.data.shape[1]), int(self.data.shape[0]))]

    def read(self, level, x, y, w, h, x0, y0):
        return self.data[y : y + h, x : x + w]


class Slide:
    """An H&E slide opened by :func:`open_slide`. Coordinates are level-0 pixels (x right, y down)."""

    def __init__(self, path: Path, backend: _Backend, mpp: float, mpp_source: str) -> None:
        self.path = path
        self._backend = backend
        self.backend = backend.name
        self.mpp = float(mpp)
        self.mpp_source = mpp_source
        self.meta_mpp: float | None = None  # µm/px the file's metadata states (set by open_slide)
        self.meta_mpp_source = ""
        self.level_dimensions: list[tuple[int, int]] = [tuple(d) for d in backend.level_dimensions]
        self.dimensions: tuple[int, int] = self.level_dimensions[0]
        self.level_count = len(self.level_dimensions)
        w0, h0 = self.dimensions
        self.level_downsamples: list[float] = [((w0 / w) + (h0 / h)) / 2.0 for w, h in self.level_dimensions]

    def __repr__(self) -> str:
        return (
            f"Slide({str(self.path)!r}, backend={self.backend}, dimensions={self.dimensions}, "
            f"levels={self.level_count}, mpp={self.mpp:g})"
        )

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._backend.close()

    def check_decode(self, level: int, box: tuple[float, float, float, float] | None = None, *,
                     what: str = "downsampled read") -> None:
        """Refuse a read of level-0 ``box`` (whole slide if None) at ``level`` that would decode more
        than :data:`MAX_DECODE_PX` pixels (one InputError naming the file and what to do)."""
        w0, h0 = self.dimensions
        x0, y0, x1, y1 = box if box is not None else (0.0, 0.0, float(w0), float(h0))
        ds = float(self.level_downsamples[level])
        n = max(0.0, (x1 - x0) / ds) * max(0.0, (y1 - y0) / ds)
        if n > MAX_DECODE_PX:
            smallest = self.level_dimensions[-1]
            raise InputError(
                f"the image declares {w0} x {h0} px at level 0 and its smallest pyramid level is "
                f"{smallest[0]} x {smallest[1]} px: a {what} would decode {n / 1e9:.1f} gigapixels "
                f"(more than {MAX_DECODE_PX / 1e9:.1f}); refused",
                file=self.path, field="dimensions",
                expected="a slide with a pyramid (reduced-resolution levels), e.g. written with "
                         "`vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`, and real dimensions")

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """Largest level whose downsample does not exceed ``downsample`` (OpenSlide's rule)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-6):
                best = i
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """(h, w, 3) uint8 RGB; ``location`` in level-0 px; outside the slide is white."""
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} out of range (0..{self.level_count - 1})")
        w, h = int(size[0]), int(size[1])
        if w < 0 or h < 0:
            raise ValueError(f"negative region size {size}")
        x0, y0 = int(location[0]), int(location[1])
        try:
            return self._read_region(x0, y0, level, w, h)
        except Exception as exc:  # damaged tiles: OpenSlideError, tifffile / codec errors
            raise InputError(
                f"cannot read region x={x0} y={y0} level={level} size={w}x{h} ({type(exc).__name__}: {exc})",
                file=self.path,
                expected="a readable slide",
            ) from None

    def _read_region(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        if self.backend == "openslide":
            if w == 0 or h == 0:
                return np.full((h, w, 3), 255, dtype=np.uint8)
            return self._backend.read(level, 0, 0, w, h, x0, y0)
        ds = self.level_downsamples[level]
        lx, ly = int(math.floor(x0 / ds)), int(math.floor(y0 / ds))
        lw, lh = self.level_dimensions[level]
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        ax0, ay0 = max(lx, 0), max(ly, 0)
        ax1, ay1 = min(lx + w, lw), min(ly + h, lh)
        if ax1 > ax0 and ay1 > ay0:
            data = self._backend.read(level, ax0, ay0, ax1 - ax0, ay1 - ay0, x0, y0)
            out[ay0 - ly : ay1 - ly, ax0 - lx : ax1 - lx] = data
        return out

    def thumbnail(self, max_size: int) -> tuple[np.ndarray, float]:
        """RGB image whose longer side is at most ``max_size``, read from the best pyramid
        level; returns ``(image, downsample)`` with downsample = level-0 px per thumbnail px."""
        from PIL import Image

        w0, h0 = self.dimensions
        target = max(w0, h0) / float(max_size)
        level = self.get_best_level_for_downsample(max(target, 1.0))
        lw, lh = self.level_dimensions[level]
        self.check_decode(level, what=f"thumbnail of at most {max_size} px")
        scale = min(1.0, max_size / max(lw, lh))
        if lw * lh <= STRIP_PX:  # the level in one read
            img = self.read_region((0, 0), level, (lw, lh))
            if scale < 1.0:
                size = (max(1, int(round(lw * scale))), max(1, int(round(lh * scale))))
                img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))
        else:  # a large level: strips of at most STRIP_PX level px, each resized into its rows
            img = self._thumbnail_strips(level, scale)
        downsample = ((w0 / img.shape[1]) + (h0 / img.shape[0])) / 2.0
        return img, float(downsample)


    def _thumbnail_strips(self, level: int, scale: float) -> np.ndarray:
        from PIL import Image

        lw, lh = self.level_dimensions[level]
        ds = float(self.level_downsamples[level])
        ow, oh = max(1, int(round(lw * scale))), max(1, int(round(lh * scale)))
        fy = lh / oh  # level rows per output row
        rows = max(1, int((STRIP_PX // max(lw, 1)) / fy))  # output rows per strip
        out = np.empty((oh, ow, 3), np.uint8)
        for r0 in range(0, oh, rows):
            r1 = min(oh, r0 + rows)
            ly0, ly1 = int(math.floor(r0 * fy)), min(lh, int(math.ceil(r1 * fy)))
            region = self.read_region((0, int(round(ly0 * ds))), level, (lw, ly1 - ly0))
            box = (0.0, r0 * fy - ly0, float(lw), r1 * fy - ly0)
            out[r0:r1] = np.asarray(Image.fromarray(np.ascontiguousarray(region)).resize(
                (ow, r1 - r0), Image.Resampling.LANCZOS, box=box))
        return out


# ---------------------------------------------------------------------- opening
def _tiff_mpp(tif: Any) -> tuple[float | None, str]:
    """MPP from TIFF resolution tags, Aperio description or OME PhysicalSizeX."""
    page = tif.pages[0]
    try:
        unit = page.tags.get("ResolutionUnit")
        xres = page.tags.get("XResolution")
        if unit is not None and xres is not None:
            u = int(unit.value)
            num, den = xres.value if isinstance(xres.value, tuple) else (xres.value, 1)
            ppu = float(num) / float(den) if den else 0.0
            if ppu > 0 and u in (2, 3):
                value = (25400.0 if u == 2 else 10000.0) / ppu
                if _plausible(value):
                    return value, f"TIFF resolution tags ({'inch' if u == 2 else 'centimetre'})"
                log.warning("%s: TIFF resolution gives %.4g µm/px, implausible for H&E: ignored", tif.filehandle.path, value)
    except (TypeError, ValueError, ZeroDivisionError):
        pass
    if getattr(tif, "is_svs", False):
        try:
            import tifffile

            meta = tifffile.svs_description_metadata(page.description)
            value = _plausible(float(meta.get("MPP")))
            if value:
                return value, "Aperio MPP"
        except Exception:
            pass
    if getattr(tif, "is_ome", False) and tif.ome_metadata:
        try:
            root = ET.fromstring(tif.ome_metadata)
            for el in root.iter():
                if el.tag.endswith("Pixels") and el.get("PhysicalSizeX"):
                    factor = _OME_UNITS_UM.get(el.get("PhysicalSizeXUnit", "µm"), 1.0)
                    value = _plausible(float(el.get("PhysicalSizeX")) * factor)
                    if value:
                        return value, "OME PhysicalSizeX"
                    break
        except (ET.ParseError, ValueError, TypeError):
            pass
    return None, ""


def _pil_mpp(img: Any) -> tuple[float | None, str]:
    dpi = img.info.get("dpi")
    if dpi:
        try:
            value = _plausible(25400.0 / float(dpi[0]))
            if value:
                return value, "image dpi"
        except (TypeError, ValueError, ZeroDivisionError):
            pass
    return None, ""


def _tiff_levels(path: Path):
    """Open with tifffile; returns (TiffFile, number of levels) or (None, error text)."""
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # not a TIFF, truncated, ...
        return None, str(exc)
    try:
        if not tif.series:
            tif.close()
            return None, "no image series"
        s = tif.series[0]
        if "X" not in s.axes or "Y" not in s.axes:
            tif.close()
            return None, f"series axes {s.axes!r} are not an image"
        return tif, len(s.levels)
    except Exception as exc:
        tif.close()
        return None, str(exc)


def open_slide(path: str | Path, mpp: float | str | None = None) -> Slide:
    """Open an H&E image. ``mpp`` (sheet he_mpp) overrides the file's metadata when given."""
    p = Path(path)
    if not p.is_file():
        raise InputError("H&E image not found", file=p, expected="an existing slide file")
    mpp_arg = _mpp_argument(mpp, p)
    errors: list[str] = []
    backend: _Backend | None = None
    meta_mpp: float | None = None
    source = ""

    osr = None
    try:
        import openslide

        osr = openslide.OpenSlide(str(p))
    except Exception as exc:  # OpenSlideUnsupportedFormatError, OpenSlideError, ...
        errors.append(f"openslide: {exc}")
    if osr is not None:
        try:
            value = osr.properties.get("openslide.mpp-x")
            meta_mpp = _plausible(float(value)) if value is not None else None
            source = "openslide.mpp-x" if meta_mpp else ""
        except (TypeError, ValueError):
            meta_mpp = None
        backend = _OpenSlideBackend(osr)
        if osr.level_count == 1:
            tif, n = _tiff_levels(p)
            if tif is not None and isinstance(n, int) and n > 1:
                log.info("%s: OpenSlide sees 1 level, tifffile %d (SubIFD pyramid): using tifffile", p, n)
                backend.close()
                backend = _TiffBackend(tif)
            elif tif is not None:
                tif.close()

    if backend is None:
        tif, info = _tiff_levels(p)
        if tif is not None:
            try:
                backend = _TiffBackend(tif)
            except Exception as exc:
                tif.close()
                errors.append(f"tifffile: {exc}")
        else:
            errors.append(f"tifffile: {info}")

    if backend is None:
        try:
            from PIL import Image

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data" on damaged TIFFs
                with Image.open(p) as img:
                    img.load()
                    meta_mpp, source = _pil_mpp(img)
                    backend = _PILBackend(img)
        except Exception as exc:
            errors.append(f"pillow: {exc}")

    if backend is None:
        raise InputError(
            "cannot read the image (" + "; ".join(errors) + ")",
            file=p,
            expected="a whole-slide image OpenSlide or tifffile can open (SVS, NDPI, MRXS, (OME-)TIFF) or PNG/JPEG",
        )

    if meta_mpp is None and backend.name in ("openslide", "tifffile"):
        tif, _ = _tiff_levels(p) if backend.name == "openslide" else (backend.tif, 0)  # type: ignore[attr-defined]
        if tif is not None:
            meta_mpp, source = _tiff_mpp(tif)
            if backend.name == "openslide":
                tif.close()

    meta_source = source
    if mpp_arg is not None:
        if meta_mpp is not None and abs(meta_mpp - mpp_arg) / mpp_arg > 0.05:
            log.warning("%s: he_mpp %.4g overrides %s %.4g", p, mpp_arg, source, meta_mpp)
        final, source = mpp_arg, "he_mpp argument"
    elif meta_mpp is not None:
        final = meta_mpp
    else:
        backend.close()
        raise InputError(
            "no microns-per-pixel in the image metadata (openslide.mpp-x, TIFF resolution tags in cm/inch, "
            "OME PhysicalSizeX); set he_mpp for this sample in the sample sheet",
            file=p,
            field="mpp",
            expected="a resolution in the file or he_mpp in the sample sheet",
        )
    w0, h0 = backend.level_dimensions[0]
    if max(w0, h0) > MAX_SIDE_PX or min(w0, h0) < 1:
        backend.close()
        raise InputError(f"the image declares {w0} x {h0} px at level 0", file=p, field="dimensions",
                         expected=f"between 1 and {MAX_SIDE_PX} px per side (a whole slide at 0.1 µm/px "
                                  "is under 750,000 px)")
    slide = Slide(p, backend, final, source)
    slide.meta_mpp = meta_mpp  # what the file itself says (None: nothing), whatever the sheet overrides
    slide.meta_mpp_source = meta_source
    log.info("opened %r (mpp from %s)", slide, source)
    return slide
