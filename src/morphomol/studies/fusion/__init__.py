"""The fusion study (seed 002): Xenium transcript tokens injected into a ViT over H&E tiles.

Torch-free here; the models and runners are imported from their modules:

* :mod:`.settings`   Table A.1 / A.2 settings (torch-free, validated against the settings schema)
* :mod:`.study`      the study's registry entry and pre-flight checks (torch-free)
* :mod:`.models`     every model variant built from one setting
* :mod:`.data`       a fold's batch sources over the tile / token stores
* :mod:`.regression`, :mod:`.clip`, :mod:`.baselines`   one run of each kind
* :mod:`.tables`, :mod:`.plots`   Table A.1 / A.2, per-gene statistics and figures
"""
