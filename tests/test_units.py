"""The unit table opens in scanpy / squidpy as it is: obsm['spatial'] in µm and uns['spatial'] (the H&E
resampled into that µm frame through the sample's registration, scale factors in the Space Ranger
convention), tested on a unit table written by the tokens stage of a simulated two-region sample."""

from __future__ import annotations

import numpy as np
import pytest

from test_io_samples import finished_sample_dir  # noqa: F401  (module fixture)


@pytest.fixture(scope="module")
def units(finished_sample_dir):  # noqa: F811
    import anndata as ad

    return ad.read_h5ad(finished_sample_dir / "samples" / "S01" / "units.h5ad"), finished_sample_dir


def test_uns_spatial_convention(units):
    a, _ = units
    lib = a.uns["spatial"]["S01"]
    img = lib["images"]["hires"]
    sf = lib["scalefactors"]
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and max(img.shape[:2]) <= 2000
    xy = np.asarray(a.obsm["spatial"])
    # every unit centre falls inside the image at hires px = µm * tissue_hires_scalef
    assert (xy * sf["tissue_hires_scalef"] < np.array(img.shape[1::-1])).all() and (xy >= 0).all()
    assert sf["spot_diameter_fullres"] == pytest.approx(48 * 0.5)  # tiles drawn at their stride (µm)
    assert lib["metadata"]["coordinates"] == "µm"


def test_hires_image_is_the_registered_he(units):
    """The hires pixel under each tile centre is the H&E pixel at that tile's centre (both regions of the
    registration are resampled through their own affine)."""
    from morphomol.io.he import open_slide

    a, root = units
    lib = a.uns["spatial"]["S01"]
    img, s = lib["images"]["hires"].astype(float), lib["scalefactors"]["tissue_hires_scalef"]
    obs = a.obs
    with open_slide(root / "sim" / "S01" / "he.tif") as slide:
        thumb, ds = slide.thumbnail(2000)
    cx = (obs["x_px"] + obs["size_px"] / 2).to_numpy() / ds
    cy = (obs["y_px"] + obs["size_px"] / 2).to_numpy() / ds
    he = thumb[np.clip(cy.astype(int), 0, thumb.shape[0] - 1), np.clip(cx.astype(int), 0, thumb.shape[1] - 1)].astype(float)
    xy = np.asarray(a.obsm["spatial"]) * s
    got = img[xy[:, 1].astype(int), xy[:, 0].astype(int)]
    # mean absolute RGB difference per tile centre, in each of the two registration regions (one region's
    # affine used for both puts the second region's centres microns off: medians of ~40 and more)
    err = np.abs(got - he).mean(axis=1)
    assert set(obs["region"]) == {0, 1}
    for r in (0, 1):
        e = err[obs["region"].to_numpy() == r]
        assert np.median(e) < 8 and np.percentile(e, 90) < 25, (r, np.median(e), np.percentile(e, 90))


def test_scanpy_spatial_plot_and_squidpy_neighbors(units):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc
    import squidpy as sq

    a, _ = units
    b = a.copy()
    axes = sc.pl.spatial(b, library_id="S01", img_key="hires", color="n_transcripts", show=False)
    ims = axes[0].get_images()
    assert ims and ims[0].get_array().shape[:2] == b.uns["spatial"]["S01"]["images"]["hires"].shape[:2]
    plt.close("all")
    sq.gr.spatial_neighbors(b, coord_type="generic", radius=48 * 0.5 * 1.01)  # tiles one stride apart
    conn = b.obsp["spatial_connectivities"]
    assert conn.shape == (b.n_obs, b.n_obs) and conn.nnz > 0
    deg = np.asarray(conn.sum(axis=1)).ravel()
    assert deg.max() <= 4 + 1e-9 and np.median(deg) >= 2  # a square grid in µm (up to the affine)
    sq.gr.spatial_neighbors(b)  # squidpy's default (grid, from uns['spatial']) works too
    assert b.obsp["spatial_connectivities"].nnz > 0


def test_write_units_without_image_has_no_uns_spatial(tmp_path):
    import anndata as ad
    import pandas as pd

    from morphomol.data.units import write_units

    p = write_units(tmp_path / "u.h5ad", pd.DataFrame(index=["a", "b"]), np.eye(2), ["G1", "G2"],
                    spatial_um=np.zeros((2, 2)), unit="cell", sample="S")
    assert "spatial" not in ad.read_h5ad(p).uns
