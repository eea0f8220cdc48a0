# Adapter of rule `slides_simulate` (workflow/rules/slides.smk): one typed call.
from pathlib import Path

from morphomol.smk import run
from morphomol.synthetic.slides import simulate_slides_cohort

run(lambda smk: simulate_slides_cohort(
    Path(smk.output.rna).parent,
    smk.params.sheet,
    smk.params.simulate,
    config_file=smk.params.config_file,
    slides_dir=smk.output.slides,
))
