# Adapter of rules `cells_simulate_h5ad` and `cells_simulate_xenium` (workflow/rules/cells.smk): one typed call.
from morphomol.smk import run
from morphomol.synthetic.cells import simulate_cells_sample

run(lambda smk: simulate_cells_sample(
    {k: smk.output[k] for k in smk.output.keys()},
    sample=smk.wildcards.sample,
    patient=smk.params.patient_id,
    kind="h5ad" if smk.rule == "cells_simulate_h5ad" else "xenium",
    params=smk.params.simulate,
))
