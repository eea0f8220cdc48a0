"""The spots study (seed 001): frozen pathology FM + 2-layer head on Visium / legacy-ST / HEST spots.

Torch-free (read while Snakemake builds the DAG): :mod:`.config` (section ``spots``), :mod:`.settings`
(``config/experiments/spots.yaml``), :mod:`.study` (registry entry, the ``visium`` cohort kind, pre-flight
checks), :mod:`.layout` (input files of each layout, local model directories).

Per sample: :mod:`.readers` (Space Ranger, legacy ST, HEST-1k -> ``SpotData``), :mod:`.geometry` (spot
pitch, µm/px and its checks), :mod:`.units` (unit table, patch store, QC), :mod:`.captions` (user CSVs,
a local VLM). Per cohort: :mod:`.targets` (genes per fold), :mod:`.text` (sentence embeddings),
:mod:`.data` (spots in memory per fold), :mod:`.models` (head + alignment, torch), :mod:`.train`
(settings over folds x seeds on the shared loop), :mod:`.baselines` (HEST ridge, CV ridge, mean),
:mod:`.tables`, :mod:`.outputs` (per-sample AnnData, maps).
"""
