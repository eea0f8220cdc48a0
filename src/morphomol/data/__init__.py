"""On-disk artifacts: the one place that reads and writes each of them, and the training loader.

* :mod:`.units`     the per-sample unit table (``units.h5ad``): the contract every study shares
* :mod:`.features`  frozen-feature stores (``features/{encoder}/{sample}.zarr``), rows = units
* :mod:`.stores`    tile image stores (``tiles.zarr``) and token stores (``tokens.zarr``)
* :mod:`.loader`    the chunk-shuffling training loader over those stores
* :mod:`.folds`     a cohort's fold artifacts (``splits/folds.parquet``, a study's ``panels/fold{k}.json``)
* :mod:`.runs`      run artifacts (``metrics.json``, ``predictions.parquet``)

Submodules are imported on use (no heavy imports here).
"""
