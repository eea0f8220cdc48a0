"""On-disk artifacts: the one place that reads and writes each of them, and the training loader.

* :mod:`.units`     the per-sample unit table (``units.h5ad``): the contract every study shares
* :mod:`.features`  frozen-feature stores (``features/{encoder}/{sample}.zarr``), rows = units
* :mod:`.stores`    tile image stores (``tiles.zarr``) and token stores (``tokens.zarr``)
* :mod:`.loader`    the chunk-shuffling training loader over those stores
* :mod:`.runs`      run artifacts (``metrics.json``, ``predictions.parquet``), splits and fold panels

Submodules are imported on use (no heavy imports here).
"""
