"""Field-native outputs: what morphomol writes, in the formats its users' tools open.

* :mod:`.predictions`  per-sample predictions AnnData (``layers['measured']``, ``layers['pred_<setting>']``,
  obs ``fold`` / ``partition``): rule ``fusion_sample_predictions``, ``morphomol predict``;
* :mod:`.spatialdata`  ``morphomol export spatialdata``: one SpatialData zarr per sample (H&E + affine to µm,
  units as shapes, transcripts as points, tables with counts and predictions);
* :mod:`.qupath`       ``morphomol export qupath``: GeoJSON in level-0 H&E px (units with measurements,
  tissue contours, registration regions);
* :mod:`.explorer`     ``morphomol export explorer``: ``*_he_imagealignment.csv`` for Xenium Explorer;
* :mod:`.features`     ``morphomol export features``: HEST / TRIDENT-style h5 (``features``, ``coords``, ``barcodes``);
* :mod:`.sample`       where a finished sample's artifacts are (the workflow's own ``workflow/paths.py``).

Each works on a finished sample; one that has not run is one InputError naming the missing file.
Unit tables themselves (``units.h5ad``) already open in scanpy / squidpy (``uns['spatial']``).
"""
