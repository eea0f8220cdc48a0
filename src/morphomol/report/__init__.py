"""Reporting building blocks shared by studies (submodules are imported on use):

* :mod:`.render`    CSV / Markdown / LaTeX tables with escaping, cell formats, best-value marking
* :mod:`.runs`      all runs' ``metrics.json`` in long form, fold aggregation and status cells
* :mod:`.metadata`  run metadata (config, package versions, weight checksums)
* :mod:`.figures`   generic figure helpers (matplotlib Agg; imported only by the plots rule)
"""
