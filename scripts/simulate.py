# Adapter for rule `simulate` (workflow/rules/simulate.smk): no logic here.
from pathlib import Path

from morphomol import simulate
from morphomol.smk import run


def main(smk):
    simulate.simulate_from_config(
        Path(smk.output.truth).parent,
        sample_id=smk.wildcards.sample,
        patient_id=smk.params.patient_id,
        panel=smk.params.panel,
        simulate=smk.params.simulate,
        he_mpp=smk.params.he_mpp,
    )


run(main)
