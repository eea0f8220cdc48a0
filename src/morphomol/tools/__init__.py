"""The ``morphomol`` verbs beyond the workflow: :mod:`.init` (a cohort from a folder of bundles),
:mod:`.doctor` (is this machine ready), :mod:`.predict` (trained models on new samples)."""
