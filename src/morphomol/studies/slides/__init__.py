"""The slides study (seed 003): slide-level contrastive alignment of frozen H&E and RNA encoders,
open-vocabulary gene-set prompting, retrieval and per-pathway R², transfer across cohorts.

Torch-free: ``config`` (typed ``slides`` section), ``study`` (registry entry, cohort kind ``slides``,
pre-flight checks), ``slide_encoders`` (registry of slide aggregators), ``tiles`` (whole-slide tiling),
``rna`` (bulk RNA), ``genesets`` (GMT, ssGSEA), ``data``, ``embed``, ``evaluate``, ``tables``, ``plots``.
With torch: ``models``, ``align``, ``run`` (a fold), ``transfer``. The rules are
``workflow/rules/slides.smk``; the simulator is :mod:`morphomol.synthetic.slides`.
"""

# the bulk-RNA expression encoder family (torch-free registration), so that `encoders: {bulkrnabert: ...}`
# is known wherever the configuration is loaded
from morphomol.encoders import bulk_rna  # noqa: F401
