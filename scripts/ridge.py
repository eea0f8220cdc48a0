# Snakemake adapter for rule `ridge` (workflow/rules/features.smk): no logic here.
from morphomol import ridge
from morphomol.smk import run

run(ridge.run_rule)
