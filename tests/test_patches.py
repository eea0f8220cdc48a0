"""Unit-centred patches: planning at the slide's edges, centring, store layout (real SVS)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from morphomol.errors import InputError
from morphomol.io.he import open_slide
from morphomol.patches import OUTSIDE, PARTLY_OUTSIDE, plan_patches, write_patch_store

SVS = Path(__file__).parent / "data" / "he_images" / "cmu_small_region.svs"


@settings(max_examples=60, deadline=None)
@given(cx=st.floats(-500, 3000), cy=st.floats(-500, 3500), um=st.floats(10, 300), mpp=st.floats(0.2, 2.0))
def test_patch_is_centred_on_its_unit(cx, cy, um, mpp):
    p = plan_patches(np.array([[cx, cy]]), patch_um=um, mpp=mpp, image_wh=(2220, 2967), on_edge="pad")
    assert p.x0[0] + p.size_px / 2 == pytest.approx(cx) and p.y0[0] + p.size_px / 2 == pytest.approx(cy)
    assert p.size_px == pytest.approx(um / mpp)
    inside = 0 <= p.x0[0] and 0 <= p.y0[0] and p.x0[0] + p.size_px <= 2220 and p.y0[0] + p.size_px <= 2967
    assert p.padded[0] == (p.keep[0] and not inside)


def test_edge_modes_and_reasons():
    c = np.array([[500, 500], [5, 500], [-400, 500], [np.nan, 1]])
    pad = plan_patches(c, patch_um=100, mpp=0.5, image_wh=(1000, 1000), on_edge="pad")
    assert pad.keep.tolist() == [True, True, False, False] and pad.padded.tolist() == [False, True, False, False]
    assert pad.reason.tolist() == ["", "", OUTSIDE, OUTSIDE]
    drop = plan_patches(c, patch_um=100, mpp=0.5, image_wh=(1000, 1000), on_edge="drop")
    assert drop.keep.tolist() == [True, False, False, False] and drop.reason[1] == PARTLY_OUTSIDE
    assert drop.counts() == {"units": 4, "kept": 1, "padded": 0, f"dropped: {OUTSIDE}": 2,
                             f"dropped: {PARTLY_OUTSIDE}": 1}
    with pytest.raises(InputError):
        plan_patches(c, patch_um=100, mpp=0.5, image_wh=(1000, 1000), on_edge="clip")


def test_store_rows_are_the_exact_resampled_boxes(tmp_path):
    slide = open_slide(SVS)
    rng = np.random.default_rng(0)
    centres = np.c_[rng.uniform(0, 2220, 40), rng.uniform(0, 2967, 40)]
    centres = centres[np.lexsort((centres[:, 0], centres[:, 1]))]  # raster order
    plan = plan_patches(centres, patch_um=112, mpp=slide.mpp, image_wh=slide.dimensions)
    write_patch_store(tmp_path / "images.zarr", slide, plan, out_px=64, chunk=16, attrs={"sample": "s"})
    g = zarr.open_group(str(tmp_path / "images.zarr"), mode="r")
    arr = g["images"]
    assert arr.shape == (plan.n_kept, 64, 64, 3) and arr.chunks[0] == 16 and g.attrs["sample"] == "s"
    whole = Image.fromarray(slide.read_region((0, 0), 0, slide.dimensions))
    for row, i in enumerate(np.flatnonzero(plan.keep)[:: 7]):
        k = int(np.flatnonzero(np.flatnonzero(plan.keep) == i)[0])
        x0, y0 = plan.x0[i], plan.y0[i]
        if plan.padded[i]:
            continue
        ref = np.asarray(whole.resize((64, 64), Image.Resampling.BILINEAR, box=(x0, y0, x0 + plan.size_px,
                                                                               y0 + plan.size_px)))
        assert np.abs(ref.astype(int) - arr[k].astype(int)).max() <= 1
