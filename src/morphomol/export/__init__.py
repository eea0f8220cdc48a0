"""Field-native outputs: what morphomol writes, in the formats its users' tools open.

* :mod:`.predictions`  per-sample predictions AnnData (``layers['measured']``, ``layers['pred_<setting>']``,
  obs ``fold`` / ``partition``): rule ``fusion_sample_predictions``, ``morphomol predict``;
* :mod:`.spatialdata`  ``morphomol export spatialdata``: one SpatialData zarr per sample (H&E + affine to µm,
  one image element per registration region; units as shapes, transcripts with ``qv >= qv_min`` as
  points, tables with counts and predictions);
* :mod:`.qupath`       ``morphomol export qupath``: GeoJSON in level-0 H&E px (units with measurements,
  tissue contours where tissue detection is meaningful, registration regions);
* :mod:`.explorer`     ``morphomol export explorer``: ``*_he_imagealignment.csv`` for Xenium Explorer;
* :mod:`.features`     ``morphomol export features``: h5 that TRIDENT and HEST-Bench load as is (``features`` /
  ``embeddings``, ``coords`` with TRIDENT's attributes, ``barcodes``);
* :mod:`.cohort`       the ``export`` verb over a cohort: writes what it can, skips what a format cannot hold
  (:class:`~.sample.NotExportable`) and lists per sample what it skipped and why (``export_report.tsv``);
* :mod:`.sample`       where a finished sample's artifacts are (the workflow's own ``workflow/paths.py``).

Each works on a finished sample; one that has not run is one InputError naming the missing file (the
verb names every such sample before writing anything).
Unit tables themselves (``units.h5ad``) already open in scanpy / squidpy (``uns['spatial']``).
"""
