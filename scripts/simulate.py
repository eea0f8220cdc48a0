# Adapter of rule `simulate` (workflow/rules/simulate.smk): one typed call.
from pathlib import Path

from morphomol.smk import run
from morphomol.synthetic import simulate_from_config

run(lambda smk: simulate_from_config(
    Path(smk.output.truth).parent,
    sample_id=smk.wildcards.sample,
    patient_id=smk.params.patient_id,
    panel=smk.params.panel,
    simulate=smk.params.simulate,
    he_mpp=smk.params.he_mpp,
    config_file=smk.params.config_file,
))
