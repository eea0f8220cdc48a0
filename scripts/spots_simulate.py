# Adapter of rule `spots_simulate` (workflow/rules/spots.smk): one typed call.
from pathlib import Path

from morphomol.smk import run
from morphomol.synthetic.spots import simulate_spots_from_config

run(lambda smk: simulate_spots_from_config(
    Path(smk.output.truth).parent,
    sample_id=smk.wildcards.sample,
    patient_id=smk.params.patient_id,
    simulate=smk.params.simulate,
    he_mpp=smk.params.he_mpp,
    config_file=smk.params.config_file,
))
